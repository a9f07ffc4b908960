"""The per-step plan (no engine): token positions, which requests take the decode fast path, and the
neighbor slots it moves."""

from __future__ import annotations

import torch

from selfextend.vllm.paged import Geometry
from selfextend.vllm.plan import build_plan, token_positions

GEOMETRY = Geometry(window=4, group_size=2, inv_freq=torch.ones(2))
BLOCK = 4


def plan_for(query_lens, seq_lens, block_table):
    starts = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32)
    return build_plan(GEOMETRY, starts, torch.tensor(seq_lens, dtype=torch.int32),
                      torch.tensor(block_table, dtype=torch.int32), BLOCK, sum(query_lens))


def test_token_positions_cover_prefill_chunks_and_decodes():
    # request 0: 3 new of 10 (a chunk), request 1: decode at 6, request 2: a whole prompt of 2
    assert token_positions([0, 3, 4, 6], [10, 7, 2]).tolist() == [7, 8, 9, 6, 0, 1]


def test_decoding_requests_take_the_fast_path_and_prefills_the_general_one():
    plan = plan_for([3, 1, 1], [10, 7, 3], [[1, 2, 3], [4, 5, 0], [6, 0, 0]])
    assert plan.decode.rows.tolist() == [1, 2] and not plan.decode.is_prefix
    assert [(r.index, r.first_token, r.num_tokens, r.seq_len) for r in plan.general] == [(0, 0, 3, 10)]
    # neighbor keys: request 1 keys 3..6 (window 4) in blocks 4, 5; request 2 keys 0..2 in block 6
    assert plan.decode.tail_blocks.tolist() == [4, 5, 6]
    identity = plan.decode.tail_sin[:, :, 0] == 0  # slots moved by 0: keys 0..2 of block 4, slot 3 of 5 and 6
    assert identity.tolist() == [[True, True, True, False], [False, False, False, True], [False, False, False, True]]


def test_neighbor_move_makes_the_grouped_query_see_ordinary_distances():
    """After the move, key j sits at j + qg(p) - p: the distance to the query at qg(p) is p - j."""
    plan = plan_for([1], [11], [[1, 2, 3]])  # keys 7..10 in blocks 2 (slots 4..7) and 3 (slots 8..11)
    p, w, g = 10, 4, 2
    qg = p // g + w - w // g
    assert plan.decode.tail_blocks.tolist() == [2, 3]
    cos = plan.decode.tail_cos[:, :, 0].flatten()  # inv_freq 1: cos of the move itself, slots 4..11
    for j in range(7, 11):
        delta = (j + qg - p) - j // g  # from the stored grouped position kg(j) = j // g
        assert torch.isclose(cos[j - 4], torch.cos(torch.tensor(float(delta))))


def test_requests_sharing_a_block_at_different_positions_leave_the_fast_path():
    # both requests hold block 7 (positions 4..7); they decode at 9 and 8: different moves
    plan = plan_for([1, 1, 1], [10, 9, 6], [[1, 7, 2], [3, 7, 4], [5, 6, 0]])
    assert plan.decode.rows.tolist() == [2]
    assert [r.index for r in plan.general] == [0, 1]


def test_requests_sharing_a_block_at_the_same_position_stay_on_the_fast_path():
    plan = plan_for([1, 1], [10, 10], [[1, 7, 2], [3, 7, 4]])  # e.g. two samples of one prompt
    assert plan.decode.rows.tolist() == [0, 1] and plan.decode.is_prefix and plan.general == []


def test_a_request_reading_a_block_another_request_moves_leaves_the_fast_path():
    # request 0 (decoding at 9) moves keys 6..9, in blocks 7 and 8; request 1 (at 19) reads block 7
    # as grouped keys; request 2 shares nothing
    plan = plan_for([1, 1, 1], [10, 20, 6], [[5, 7, 8, 0, 0], [5, 7, 9, 10, 11], [1, 2, 0, 0, 0]])
    assert plan.decode.rows.tolist() == [2]
    assert [r.index for r in plan.general] == [0, 1]
