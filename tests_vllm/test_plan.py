"""The per-step plan (no engine): which rows run vLLM's stock kernel, which the decode kernel, which the
prefill kernel (general rows), and where the keys of grouped rows are written -- against the batch
written out by hand."""

from __future__ import annotations

import torch

from selfextend.vllm.plan import build_plan


def plan_for(groups, query_lens, seq_lens, block_table):
    starts = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32)
    return build_plan(torch.tensor(groups, dtype=torch.int32), starts, torch.tensor(seq_lens, dtype=torch.int32),
                      torch.tensor(block_table, dtype=torch.int32), sum(query_lens))


def test_rows_go_their_three_ways():
    # row 0: G=4 chunk (3 new of 10); row 1: G=1 decode; row 2: G=2 decode; row 3: G=1 prompt of 2
    plan = plan_for([4, 1, 2, 1], [3, 1, 1, 2], [10, 7, 9, 2], [[1, 2, 3], [4, 5, 0], [6, 7, 8], [9, 0, 0]])
    assert plan.num_tokens == 7
    assert plan.plain.rows.tolist() == [1, 3] and plan.plain.tokens.tolist() == [3, 5, 6] and plan.plain.start is None
    assert plan.plain.query_start_loc.tolist() == [0, 1, 3] and plan.plain.seq_lens.tolist() == [7, 2]
    assert plan.plain.block_table.tolist() == [[4, 5, 0], [9, 0, 0]]
    assert plan.decode.rows.tolist() == [2] and plan.decode.tokens.tolist() == [4]
    assert plan.decode.group_size.tolist() == [2] and plan.decode.seq_lens.tolist() == [9]
    assert plan.general.rows.tolist() == [0] and plan.general.tokens.tolist() == [0, 1, 2] and plan.general.start == 0
    assert plan.general.query_start_loc.tolist() == [0, 3] and plan.general.seq_lens.tolist() == [10]
    assert plan.general.block_table.tolist() == [[1, 2, 3]] and plan.general.group_size.tolist() == [4]
    assert plan.general.requests() == [(0, 0, 3, 10, 4)]


def test_keys_of_grouped_rows_move_to_their_grouped_positions():
    """Token t of a row sits at seq_len - queries + t; its key moves by (p // G) - p."""
    plan = plan_for([4, 1, 2, 1], [3, 1, 1, 2], [10, 7, 9, 2], [[1, 2, 3], [4, 5, 0], [6, 7, 8], [9, 0, 0]])
    assert plan.grouped_tokens.tolist() == [0, 1, 2, 4]  # row 0's three tokens and row 2's one
    positions = [7, 8, 9, 8]
    groups = [4, 4, 4, 2]
    assert plan.key_delta.tolist() == [p // g - p for p, g in zip(positions, groups)]


def test_a_step_of_decodes_in_batch_order_is_a_prefix():
    plan = plan_for([3, 3, 1], [1, 1, 5], [40, 41, 5], [[1, 2], [3, 4], [5, 0]])
    assert plan.decode.start == 0 and plan.decode.tokens.tolist() == [0, 1]
    assert plan.plain.tokens.tolist() == [2, 3, 4, 5, 6] and plan.plain.start == 2 and plan.general is None
