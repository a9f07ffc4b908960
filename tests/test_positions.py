"""Invariant 6: the position maths reproduces the paper's worked example and the max-length formula."""

import math

import pytest
import torch

from selfextend.positions import choose_group_size, default_window, grouped_positions, max_extended_length
from selfextend.schedule import Schedule


def relative_distance(i: int, j: int, w: int, g: float, mode: str = "floor") -> float:
    """The distance the model sees between query i and key j, written out from the paper (Section 3)."""
    if i - j < w:
        return float(i - j)
    if mode == "rerope" or math.isinf(g):
        return float(w)
    if mode == "leaky":
        return i / g + w - w / g - j / g
    return float((i // g + w - w // g) - j // g)


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


@pytest.mark.parametrize("rule, reach", [("f=0.5", 32), ("f=0.75", 48), ("f=1", 64), ("cover", 64)])
def test_a_rule_keeps_every_grouped_distance_below_its_reach_and_leaves_inputs_that_fit_exact(rule, reach):
    """Per query position p the rule's G is 1 while p < L (the plain model), and past L the smallest G whose
    largest grouped distance stays below the reach; next_group_change is exactly where G next changes."""
    from selfextend.settings import Settings

    L = 64
    settings = Settings.from_config(None, pretrained_length=L, rule=rule)
    w = settings.window
    assert w == (L // 4 if rule == "cover" else L // 8)
    schedule = Schedule(settings)  # G per position (no sequence length chosen)
    groups = [schedule.group_at(p) for p in range(1500)]
    assert set(groups[:L]) == {1}
    for p in range(L, 1500):
        g = groups[p]
        # the farthest key has the largest grouped distance: below the reach, or (when G does not divide w,
        # as with the paper's formula, see test_max_length_formula) at most equal to it
        assert relative_distance(p, 0, w, g) <= reach - (w % g == 0)
        assert (reach - w) * (g - 1) + w < p + 1 <= (reach - w) * g + w  # the smallest such G
    changes = [p for p in range(1, 1500) if groups[p] != groups[p - 1]]
    assert changes[0] == L
    runs = schedule.runs(0, 1499)
    assert [start for start, _, _ in runs[1:]] == changes  # a run ends exactly where G changes
    assert all(groups[p] == g for start, end, g in runs for p in range(start, end))
    assert runs[0][0] == 0 and runs[-1][1] == 1500 and all(a[1] == b[0] for a, b in zip(runs, runs[1:]))


def test_a_rule_and_a_fixed_group_size_exclude_each_other_and_bad_rules_are_named():
    from selfextend.settings import Settings

    with pytest.raises(ValueError, match="not both"):
        Settings.from_config(None, pretrained_length=64, group_size=4, rule="f=0.5")
    with pytest.raises(ValueError, match="unknown rule 'f=2'"):
        Settings.from_config(None, pretrained_length=64, rule="f=2")
    with pytest.raises(ValueError, match="must be more than the window w=40"):
        Settings.from_config(None, pretrained_length=64, window=40, rule="f=0.5")
    assert Settings.from_config(None, pretrained_length=64, rule="f=0.50").rule == "f=0.5"


@pytest.mark.parametrize("rule", ["f=0.5", "cover"])
def test_a_sequence_keeps_the_group_size_its_rule_chose_from_its_length(rule):
    """Schedule.for_sequence(n): past L the G the rule picks for n tokens serves every position of the
    sequence from w on (as a fixed G would) up to that G's limit, then G follows the rule per position;
    n <= L is the plain model (G = 1) up to L."""
    from selfextend.settings import Settings

    L = 64
    auto = Settings.from_config(None, pretrained_length=L, rule=rule)
    w = auto.window
    per_position = Schedule(auto)
    for n in (40, 64, 65, 100, 300):
        seq = Schedule.for_sequence(auto, n)
        g = per_position.group_for(n)  # the rule's G for n tokens
        end = int(max_extended_length(L, w, g))
        assert seq.chosen == g
        assert all(seq.group_at(p) == (1 if p < w else g) for p in range(end))
        assert all(seq.group_at(p) == per_position.group_at(p) for p in range(end, end + 200))
        if g > 1:
            assert seq.runs(0, end - 1) == [(0, w, 1), (w, end, g)]
        else:
            assert seq.runs(0, L - 1) == [(0, L, 1)] and seq.group_at(L) == per_position.group_at(L) > 1
    fixed = Settings.from_config(None, pretrained_length=L, group_size=3)
    assert Schedule.for_sequence(fixed, 300).chosen is None
    assert Schedule.for_sequence(fixed, 300).runs(0, 999) == [(0, fixed.window, 1), (fixed.window, 1000, 3)]
