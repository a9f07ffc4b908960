"""What one engine step asks of the SelfExtend backend, worked out once per step and shared by every
layer: the rotations of the new keys and queries, which requests decode on the fast path, and where
their neighbor keys sit in the paged cache.

A batch (vLLM v1) is a flat run of tokens; request ``r`` owns tokens ``query_start_loc[r] ..
query_start_loc[r + 1] - 1``, the newest ``q_r`` of its ``seq_len[r]`` tokens, so token ``t`` of it
sits at position ``seq_len[r] - q_r + t``. That covers prefill, chunked prefill, prefill after a
prefix-cache hit, decode and recompute after preemption alike.

Decode fast path. A decoding request has one query at ``p = S - 1``. Its grouped keys ``0 .. S-w-1``
are already stored at ``kg(j)``, which is what a query rotated to ``qg(p)`` needs. Its ``w`` neighbor
keys are moved for this step to ``j + qg(p) - p`` (rotation by ``qg(p) - p - (kg(j) - j)``): then
``qg(p) - (j + qg(p) - p) = p - j``, the ordinary distance. One pass of vLLM's own paged kernel over
the cache gives the exact merged softmax; the backend then writes the saved blocks back bit for bit.
The move works on whole cache blocks (the ``w / B + 1`` blocks holding the neighbor keys; other
slots in them get the identity), so it is a few contiguous copies. Cost per step: the stock kernel
plus O(w) per request.

Moved keys are seen by the whole kernel pass, so a request reading a block that another request
moves (prefix caching shares blocks) takes the general path instead, unless both decode at the same
position (then they make the same moves).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .paged import Geometry


@dataclass
class RequestSlice:
    """One request of the batch on the general path."""

    index: int        # row in the batch (block table row)
    first_token: int  # first of its tokens in the flat batch
    num_tokens: int   # new tokens this step (queries)
    seq_len: int      # tokens in its context after this step (keys)


@dataclass
class DecodePlan:
    """The decoding requests served by one stock-kernel pass, and their neighbor slots."""

    rows: torch.Tensor            # [n] long, request rows in the batch
    tokens: torch.Tensor          # [n] long, their tokens in the flat batch
    is_prefix: bool               # tokens == 0 .. n-1 (outputs can be written in place)
    query_start_loc: torch.Tensor  # [n + 1] int32, 0 .. n
    seq_lens: torch.Tensor        # [n] int32
    block_table: torch.Tensor     # [n, max_blocks] int32
    tail_blocks: torch.Tensor     # [Mb] long, the cache blocks holding neighbor keys
    tail_cos: torch.Tensor        # [Mb, B, rd / 2] float32 (then CacheLayout.orient): every slot's move
    tail_sin: torch.Tensor        # (identity for slots that are not neighbor keys)
    kernel_metadata: object = None  # the stock kernel's scheduler metadata, set by the backend


@dataclass
class StepPlan:
    """Everything position-dependent in one step, computed once for all layers."""

    num_tokens: int
    key_rotation: tuple     # cos/sin [T, 1, rd]: new keys to their grouped positions
    query_rotation: tuple   # cos/sin [T, 1, rd]: queries to their grouped query positions
    decode: DecodePlan | None
    general: list[RequestSlice]
    geometry: Geometry
    layout: object = None  # the cache's CacheLayout, set by the backend
    _neighbor_rotations: dict = field(default_factory=dict)

    def neighbor_rotation(self, request: RequestSlice) -> tuple[int, tuple]:
        """(first neighbor key f, cos/sin ``[S - f, 1, rd]``) moving the request's cached keys
        ``f .. S - 1`` back to their ordinary positions; computed once per step."""
        if request.index not in self._neighbor_rotations:
            first = max(0, request.seq_len - request.num_tokens - self.geometry.window + 1)
            _, key_shift = self.geometry.shifts(torch.arange(first, request.seq_len))
            self._neighbor_rotations[request.index] = (first, self.geometry.rotation(-key_shift))
        return self._neighbor_rotations[request.index]


def token_positions(query_start_loc: list[int], seq_lens: list[int]) -> torch.Tensor:
    """Position of every token of the flat batch: ``[T]`` long."""
    parts = []
    for r, seq_len in enumerate(seq_lens):
        q = query_start_loc[r + 1] - query_start_loc[r]
        parts.append(torch.arange(seq_len - q, seq_len))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def build_plan(geometry: Geometry, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
               block_table: torch.Tensor, block_size: int, num_tokens: int,
               fast_decode: bool = True) -> StepPlan:
    """The plan of one step from vLLM's batch metadata (CPU tensors)."""
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    positions = token_positions(starts, lens)
    assert positions.numel() == num_tokens, "batch metadata and token count disagree"
    query_shift, key_shift = geometry.shifts(positions)
    decode_rows = [r for r in range(len(lens)) if starts[r + 1] - starts[r] == 1] if fast_decode else []
    decode = _decode_plan(geometry, decode_rows, starts, lens, block_table, block_size)
    on_fast_path = set() if decode is None else set(decode.rows.tolist())
    general = [RequestSlice(r, starts[r], starts[r + 1] - starts[r], lens[r])
               for r in range(len(lens)) if r not in on_fast_path and starts[r + 1] > starts[r]]
    return StepPlan(num_tokens, geometry.rotation(key_shift), geometry.rotation(query_shift),
                    decode, general, geometry)


def key_ranges(firsts: torch.Tensor, lasts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand ranges ``firsts[i] .. lasts[i] - 1``: (index i of each element ``[M]``, the element ``[M]``)."""
    counts = lasts - firsts
    owner = torch.repeat_interleave(torch.arange(len(counts)), counts)
    offset_in_range = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return owner, firsts[owner] + offset_in_range


def _tail_blocks(geometry: Geometry, rows: list[int], lens: list[int], block_table, block_size):
    """For decoding rows: the blocks holding their neighbor keys ``[Mb]`` and the move of each of
    their slots ``[Mb, B]`` (positions; 0 for slots that are not neighbor keys)."""
    last = torch.tensor([lens[r] for r in rows])  # S per row; the query sits at S - 1
    first = (last - geometry.window).clamp(min=0)  # first neighbor key
    index, block_index = key_ranges(torch.div(first, block_size, rounding_mode="floor"),
                                    torch.div(last - 1, block_size, rounding_mode="floor") + 1)
    j = block_index[:, None] * block_size + torch.arange(block_size)  # [Mb, B] key positions
    query_shift, _ = geometry.shifts(last[index] - 1)
    _, key_shift = geometry.shifts(j)
    is_neighbor = (j >= first[index, None]) & (j < last[index, None])
    move = torch.where(is_neighbor, query_shift[:, None] - key_shift, 0.0)  # kg(j) -> j + qg(p) - p
    return block_table[torch.tensor(rows)[index], block_index].long(), move


def _decode_plan(geometry, rows, starts, lens, block_table, block_size) -> DecodePlan | None:
    """The fast-path plan for the decoding ``rows``, leaving out rows that share a moved block."""
    if not rows:
        return None
    blocks, move = _tail_blocks(geometry, rows, lens, block_table, block_size)
    clashing = _rows_sharing_moved_blocks(rows, lens, block_table, block_size, blocks)
    if clashing:
        rows = [r for r in rows if r not in clashing]
        if not rows:
            return None
        blocks, move = _tail_blocks(geometry, rows, lens, block_table, block_size)
    cos, sin = geometry.rotation(move.flatten())  # [Mb * B, 1, rd]; cos/sin repeat after rd / 2
    half = cos.shape[-1] // 2
    rows_t = torch.tensor(rows)
    tokens = torch.tensor([starts[r] for r in rows])
    return DecodePlan(
        rows=rows_t, tokens=tokens, is_prefix=bool(torch.equal(tokens, torch.arange(len(rows)))),
        query_start_loc=torch.arange(len(rows) + 1, dtype=torch.int32),
        seq_lens=torch.tensor([lens[r] for r in rows], dtype=torch.int32),
        block_table=block_table[rows_t], tail_blocks=blocks,
        tail_cos=cos[:, 0, :half].reshape(*move.shape, half), tail_sin=sin[:, 0, :half].reshape(*move.shape, half))


def _rows_sharing_moved_blocks(rows, lens, block_table, block_size, moved_blocks) -> set[int]:
    """Rows that must leave the fast path: every row reading a block that some row moves keys in,
    unless all the rows reading it decode at the same position (then they make the same moves on
    the same slots and see the same keys: e.g. several samples of one prompt).

    Moved keys are visible to the whole kernel pass, so a row further along that reads the block
    as grouped keys, or a row closer that moves other slots of it, would see wrong keys."""
    lens_t = torch.tensor([lens[r] for r in rows])
    index, block_index = key_ranges(torch.zeros_like(lens_t), -(-lens_t // block_size))  # every block read
    read = block_table[torch.tensor(rows)[index], block_index].long()
    position = (lens_t - 1)[index]
    size = int(max(read.max(), moved_blocks.max())) + 1
    lowest = torch.full((size,), torch.iinfo(torch.long).max).scatter_reduce(0, read, position, "amin")
    highest = torch.full((size,), -1).scatter_reduce(0, read, position, "amax")
    moved = torch.zeros(size, dtype=torch.bool)
    moved[moved_blocks] = True
    shared = moved & (lowest != highest)  # blocks moved and read at different positions
    return set(torch.tensor(rows)[index[shared[read]]].tolist())


# ------------------------------------------------------------------------------------------------
# the CUDA backend's plan: FlashAttention returns each part's log-sum-exp, so every request takes
# one path: grouped part over the paged cache, neighbor part over gathered keys, merged
# ------------------------------------------------------------------------------------------------


@dataclass
class FlashPlan:
    """One step of the FlashAttention backend (tensors on the model's device).

    grouped part   query at qg(p), paged cache as stored, ``seqused_k = S - w``: with FlashAttention's
                   bottom-right causal mask, the query at ``p`` sees keys ``0 .. p - w``
    neighbor part  query at p, the keys ``f .. S - 1`` of each request gathered and moved back to
                   ordinary positions (``f = max(0, S - n - w + 1)``), causal with window ``w``"""

    num_tokens: int
    key_rotation: tuple
    query_rotation: tuple
    grouped_seq_lens: torch.Tensor   # [R] int32, max(0, S - w)
    max_grouped: int
    neighbor_blocks: torch.Tensor    # [K] long
    neighbor_offsets: torch.Tensor   # [K] long
    neighbor_rotation: tuple         # cos/sin [K, 1, rd]: kg(j) back to j
    neighbor_cu_seqlens: torch.Tensor  # [R + 1] int32
    max_neighbor: int


def build_flash_plan(geometry: Geometry, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                     block_table: torch.Tensor, block_size: int, num_tokens: int) -> FlashPlan:
    """The FlashAttention plan from CPU copies of the batch metadata; ``block_table`` may live on
    the device, where the plan's tensors go."""
    device = block_table.device
    starts, lens = query_start_loc.long(), seq_lens.long()
    positions = token_positions(starts.tolist(), lens.tolist())
    assert positions.numel() == num_tokens, "batch metadata and token count disagree"
    query_shift, key_shift = geometry.shifts(positions)
    first = (lens - (starts[1:] - starts[:-1]) - geometry.window + 1).clamp(min=0)
    owner, j = key_ranges(first, lens)
    _, neighbor_shift = geometry.shifts(j)
    counts = lens - first
    grouped = (lens - geometry.window).clamp(min=0)
    to = lambda cos_sin: tuple(t.to(device, non_blocking=True) for t in cos_sin)  # noqa: E731
    owner_d, j_d = owner.to(device), j.to(device)
    return FlashPlan(
        num_tokens=num_tokens, key_rotation=to(geometry.rotation(key_shift)),
        query_rotation=to(geometry.rotation(query_shift)),
        grouped_seq_lens=grouped.to(device, torch.int32), max_grouped=int(grouped.max()) if len(grouped) else 0,
        neighbor_blocks=block_table[owner_d, torch.div(j_d, block_size, rounding_mode="floor")].long(),
        neighbor_offsets=j_d % block_size, neighbor_rotation=to(geometry.rotation(-neighbor_shift)),
        neighbor_cu_seqlens=torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(device, torch.int32),
        max_neighbor=int(counts.max()) if len(counts) else 0)
