"""What one engine step asks of the SelfExtend backend, worked out once per step (worker process) and
shared by every layer that groups keys.

A batch (vLLM v1) is a flat run of tokens; request ``r`` owns tokens ``query_start_loc[r] ..
query_start_loc[r + 1] - 1``, the newest ``q_r`` of its ``seq_len[r]`` tokens, so token ``t`` of it
sits at position ``seq_len[r] - q_r + t``. That covers prefill, chunked prefill, prefill after a
prefix-cache hit, decode and recompute after preemption alike. Each request has its own ``G``
(``settings.request_group``), and its rows go one of three ways:

    G = 1                 plain: vLLM's stock kernel over the paged cache, keys at their own positions
                          (a sub-batch of the step when other rows group)
    G > 1, one query      decode: the SelfExtend decode kernel over the paged cache (``cpu_kernel.decode``),
                          which reads the cache as stored and never writes it
    G > 1, more queries   general: the SelfExtend prefill kernel over the paged cache
                          (``cpu_kernel.prefill``), one call for all of them; without the kernels, each
                          request's keys gathered and the library's blocked kernel (``paged.attend_request``)

Keys of rows with G > 1 are written to the cache rotated to their grouped position ``j // G``, once;
nothing else in the cache ever changes. Every tensor here is built with vectorised torch ops: no loop
over requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SubBatch:
    """Some rows of the step, as a stock-kernel call (or a SelfExtend kernel) reads them."""

    rows: torch.Tensor             # [n] long, rows of the step's batch
    tokens: torch.Tensor           # [T'] long, their tokens in the step's flat batch
    start: int | None              # tokens == start .. start + T' - 1: views of the step's query and
                                   # output serve (no copies); None when the rows' tokens are not one run
    query_start_loc: torch.Tensor  # [n + 1] int32, from 0
    seq_lens: torch.Tensor         # [n] int32
    block_table: torch.Tensor      # [n, max_blocks] int32
    group_size: torch.Tensor       # [n] int32
    kernel_metadata: object = None  # the stock kernel's scheduler metadata for these rows (plain rows)

    def span(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """These rows' tokens of a step tensor (query, output) as a view, or None if they are not one run."""
        return None if self.start is None else tensor[self.start : self.start + self.tokens.numel()]

    def requests(self) -> list[tuple[int, int, int, int, int]]:
        """(row, first token, tokens, seq_len, G) of each row: for per-request paths."""
        firsts = self.tokens[self.query_start_loc[:-1].long()].tolist() if self.tokens.numel() else []
        counts = (self.query_start_loc[1:] - self.query_start_loc[:-1]).tolist()
        return list(zip(self.rows.tolist(), firsts, counts, self.seq_lens.tolist(), self.group_size.tolist()))


@dataclass(frozen=True)
class StepPlan:
    """Everything position-dependent in one step that groups keys, for all its layers."""

    num_tokens: int
    grouped_tokens: torch.Tensor   # [Tg] long: tokens whose keys are written at grouped positions
    key_delta: torch.Tensor        # [Tg] long: kg(j) - j of those tokens
    plain: SubBatch | None         # rows with G = 1
    decode: SubBatch | None        # rows with G > 1 and one query
    general: SubBatch | None       # rows with G > 1 and several queries


def build_plan(groups: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
               block_table: torch.Tensor, num_tokens: int) -> StepPlan:
    """The plan of one step from the rows' ``groups [R]`` and vLLM's batch metadata (CPU tensors)."""
    starts, lens = query_start_loc.long(), seq_lens.long()
    rows = groups.numel()
    queries = starts[1 : rows + 1] - starts[:rows]  # [R]
    grouped = groups.long() > 1
    token_rows = torch.repeat_interleave(torch.arange(rows), queries)  # [T] row of each token
    token_groups = groups.long()[token_rows]
    positions = lens[token_rows] - queries[token_rows] + torch.arange(num_tokens) - starts[token_rows]  # [T]
    grouped_tokens = torch.nonzero(token_groups > 1).flatten()
    key_delta = torch.div(positions[grouped_tokens], token_groups[grouped_tokens], rounding_mode="floor") \
        - positions[grouped_tokens]
    decode_rows = torch.nonzero(grouped & (queries == 1)).flatten()
    general_rows = torch.nonzero(grouped & (queries > 1)).flatten()
    plain_rows = torch.nonzero(~grouped & (queries > 0)).flatten()
    return StepPlan(num_tokens, grouped_tokens, key_delta,
                    _sub_batch(plain_rows, starts, queries, lens, block_table, groups),
                    _sub_batch(decode_rows, starts, queries, lens, block_table, groups),
                    _sub_batch(general_rows, starts, queries, lens, block_table, groups))


def _sub_batch(rows, starts, queries, lens, block_table, groups) -> SubBatch | None:
    if rows.numel() == 0:
        return None
    counts = queries[rows]
    tokens = torch.repeat_interleave(starts[rows] - torch.cumsum(counts, 0) + counts, counts) \
        + torch.arange(int(counts.sum()))
    local_starts = torch.zeros(rows.numel() + 1, dtype=torch.int32)
    local_starts[1:] = torch.cumsum(counts, 0)
    first = int(tokens[0]) if tokens.numel() else 0
    one_run = bool(torch.equal(tokens, torch.arange(first, first + tokens.numel())))
    return SubBatch(rows=rows, tokens=tokens, start=first if one_run else None,
                    query_start_loc=local_starts, seq_lens=lens[rows].to(torch.int32),
                    block_table=block_table[rows], group_size=groups[rows].to(torch.int32))
