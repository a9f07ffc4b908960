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
the cache gives the exact merged softmax; the backend then writes the saved neighbor keys back
bit for bit. Cost per step: the stock kernel plus O(w) per request.

Two decoding requests that share a cached block (prefix caching) at different positions would need
different rotations of the same slot; such requests take the general path instead.
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
    slot_blocks: torch.Tensor     # [M] long, block of each neighbor slot
    slot_offsets: torch.Tensor    # [M] long, offset inside the block
    slot_rotation: tuple          # cos/sin [M, 1, rd]: the step's move of each neighbor key
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


def _neighbor_slots(geometry: Geometry, rows: list[int], lens: list[int], block_table, block_size):
    """For decoding rows: (row of each neighbor slot, its position j, its move for this step)."""
    w = geometry.window
    counts = torch.tensor([min(lens[r], w) for r in rows])
    owner = torch.repeat_interleave(torch.tensor(rows), counts)  # [M] request row of each slot
    last = torch.tensor([lens[r] for r in rows])  # S per row
    start = torch.repeat_interleave(last - counts, counts)
    first_of_row = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    j = start + torch.arange(int(counts.sum())) - first_of_row  # [M] key positions
    query_position = torch.repeat_interleave(last - 1, counts)
    query_shift, _ = geometry.shifts(query_position)
    _, key_shift = geometry.shifts(j)
    move = query_shift - key_shift  # rotation taking kg(j) to j + qg(p) - p
    blocks = block_table[owner, torch.div(j, block_size, rounding_mode="floor")].long()
    return owner, blocks, j % block_size, move


def _decode_plan(geometry, rows, starts, lens, block_table, block_size) -> DecodePlan | None:
    """The fast-path plan for the decoding ``rows``, leaving out rows whose neighbor slots clash."""
    if not rows:
        return None
    owner, blocks, offsets, move = _neighbor_slots(geometry, rows, lens, block_table, block_size)
    clashing = _clashing_rows(owner, blocks * block_size + offsets, move)
    if clashing:
        rows = [r for r in rows if r not in clashing]
        if not rows:
            return None
        owner, blocks, offsets, move = _neighbor_slots(geometry, rows, lens, block_table, block_size)
    rows_t = torch.tensor(rows)
    tokens = torch.tensor([starts[r] for r in rows])
    return DecodePlan(
        rows=rows_t, tokens=tokens, is_prefix=bool(torch.equal(tokens, torch.arange(len(rows)))),
        query_start_loc=torch.arange(len(rows) + 1, dtype=torch.int32),
        seq_lens=torch.tensor([lens[r] for r in rows], dtype=torch.int32),
        block_table=block_table[rows_t], slot_blocks=blocks, slot_offsets=offsets,
        slot_rotation=geometry.rotation(move))


def _clashing_rows(owner: torch.Tensor, slots: torch.Tensor, move: torch.Tensor) -> set[int]:
    """Rows owning a slot that another row must move differently this step (shared prefix blocks
    at different positions). Equal moves of one slot are harmless: they write the same values."""
    order = torch.argsort(slots, stable=True)
    s, m, o = slots[order], move[order], owner[order]
    clash = (s[1:] == s[:-1]) & (m[1:] != m[:-1])
    if not bool(clash.any()):
        return set()
    return set(o[1:][clash].tolist()) | set(o[:-1][clash].tolist())
