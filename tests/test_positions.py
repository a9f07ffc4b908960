"""Invariant 6: the position maths reproduces the paper's worked example and the max-length formula."""

import math

import pytest
import torch

from selfextend.positions import (choose_group_size, default_window, grouped_positions, max_extended_length,
                                  relative_distance)


def test_figure3_worked_example():
    # L = 7, w = 4, G = 2 extends to (7 - 4) * 2 + 4 = 10 tokens
    assert max_extended_length(7, 4, 2) == 10
    # the paper's Figure 3: relative distances seen by a sequence of 10 tokens
    expected_last_row = [6, 6, 5, 5, 4, 4, 3, 2, 1, 0]
    assert [relative_distance(9, j, 4, 2) for j in range(10)] == expected_last_row
    # no distance ever reaches L
    seen = [relative_distance(i, j, 4, 2) for i in range(10) for j in range(i + 1)]
    assert max(seen) == 6 == 7 - 1


@pytest.mark.parametrize("L,w,G", [(7, 4, 2), (4096, 1024, 4), (64, 16, 4), (64, 16, 5), (100, 33, 7), (8192, 2048, 3)])
def test_max_length_formula(L, w, G):
    """(L - w) * G + w keeps every distance below L when G divides w (the paper's setting); when it
    does not, the last w % G tokens reach distance exactly L (documented in positions.py)."""
    n = int(max_extended_length(L, w, G))
    largest = relative_distance(n - 1, 0, w, G)  # the farthest pair is the largest distance
    if L < 200:
        assert largest == max(relative_distance(i, j, w, G) for i in range(n) for j in range(i + 1))
    assert largest == (L - 1 if w % G == 0 else L)
    assert relative_distance(n + G - 1, 0, w, G) > largest  # one group further is out of range


def test_grouped_positions_integer_division():
    p = torch.arange(0, 40)
    qg, kg = grouped_positions(p, 6, 4, "floor")
    assert torch.equal(kg, (p // 4).double())
    assert torch.equal(qg, (p // 4 + 6 - 6 // 4).double())  # w // G, not w / G (official code's bug)


def test_modes():
    assert relative_distance(100, 0, 8, math.inf, "rerope") == 8
    assert relative_distance(100, 0, 8, 4, "leaky") == 8 + (100 - 8) / 4
    assert relative_distance(5, 0, 8, 4, "leaky") == 5


def test_choose_group_size():
    assert choose_group_size(8192, 8192, 2048) == 1
    assert choose_group_size(8193, 8192, 2048) == 2
    assert choose_group_size(16000, 8192, 2048) == 3
    # official README example: 15,800 tokens, w = 1024, L = 4096 -> G = 5
    assert choose_group_size(15800, 4096, 1024) == 5
    for n in (5000, 9000, 33333, 100000):
        g = choose_group_size(n, 4096, 1024)
        assert max_extended_length(4096, 1024, g) >= n > max_extended_length(4096, 1024, g - 1)
    assert default_window(8192) == 2048 and default_window(4096) == 1024


def test_automatic_group_size_is_capped_where_the_stated_limit_says():
    from selfextend.positions import DEFAULT_MAX_GROUP_SIZE

    L, w = 64, 16
    limit = (L - w) * DEFAULT_MAX_GROUP_SIZE + w
    assert choose_group_size(limit, L, w) == DEFAULT_MAX_GROUP_SIZE
    assert choose_group_size(limit + 1, L, w) == DEFAULT_MAX_GROUP_SIZE  # capped, not 65
    assert choose_group_size(10**9, L, w) == DEFAULT_MAX_GROUP_SIZE
