"""Position maths of SelfExtend: grouped positions, the extended length, and parameter choice.

Symbols (paper, Section 3; ARCHITECTURE.md):

    L  pretrained context length (the model's ``max_position_embeddings``)
    w  neighbor window: pairs closer than ``w`` use ordinary positions
    G  group size: pairs ``w`` or more apart use floor-divided positions

    grouped key position    kg(j) = p_j // G
    grouped query position  qg(i) = p_i // G + w - w // G

For every causal pair the model sees either the ordinary distance ``p_i - p_j < w`` or the grouped
distance ``qg(i) - kg(j)``, which stays below ``L`` while the sequence has at most
``(L - w) * G + w`` tokens. Paper Figure 3 (L=7, w=4, G=2), relative distances seen::

    query 9 | 6 6 5 5 4 4 3 2 1 0      <- keys 0..5 grouped, 6..9 neighbors
            +--------------------
              0 1 2 3 4 5 6 7 8 9  key

Modes
    "floor"   SelfExtend itself.
    "rerope"  G -> infinity: every key ``w`` or more away sits at distance exactly ``w`` (ReRoPE).
    "leaky"   no floor: distance ``d >= w`` becomes ``w + (d - w) / G`` (Leaky ReRoPE).
"""

from __future__ import annotations

import math

import torch

MODES = ("floor", "rerope", "leaky")
DEFAULT_MAX_GROUP_SIZE = 64


def default_window(pretrained_length: int) -> int:
    """Neighbor window used when the caller gives none: ``L // 4`` (1024 for L = 4096, as in the
    official example; the paper finds 512..1536 all work for L = 4096)."""
    return max(1, pretrained_length // 4)


def max_extended_length(pretrained_length: int, window: int, group_size: float) -> float:
    """The paper's extended length ``(L - w) * G + w``; infinite for ``G = inf`` (ReRoPE).

    Exact when ``G`` divides ``w`` (largest distance ``L - 1``). Otherwise, with integer division in
    ``qg``, the last ``w % G`` tokens of such a sequence reach distance exactly ``L`` -- one past the
    trained range; the paper's formula is kept because users and the paper quote it."""
    if math.isinf(group_size):
        return math.inf
    return (pretrained_length - window) * group_size + window


def choose_group_size(length: int, pretrained_length: int, window: int,
                      max_group_size: int = DEFAULT_MAX_GROUP_SIZE) -> int:
    """Smallest integer ``G >= 1`` with ``(L - w) * G + w >= length`` (paper + official README),
    capped at ``max_group_size``: beyond ``(L - w) * max_group_size + w`` tokens G stays there.

    ``G = 1`` means the input fits the trained window and nothing needs to be grouped."""
    if length <= pretrained_length:
        return 1
    return min(max_group_size, max(1, math.ceil((length - window) / (pretrained_length - window))))


def grouped_positions(
    positions: torch.Tensor, window: int, group_size: float, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped query and key positions for ordinary ``positions`` (any shape, integer or float).

    Returns ``(query_positions, key_positions)`` as float64 tensors of the same shape, such that
    ``query_positions[i] - key_positions[j]`` is the distance SelfExtend uses for a grouped pair.
    """
    p = positions.to(torch.float64)
    if mode == "rerope" or math.isinf(group_size):
        # every grouped key at position 0, every query at position w: distance exactly w
        return torch.full_like(p, float(window)), torch.zeros_like(p)
    if mode == "floor":
        g = int(group_size)
        return (
            torch.div(p, g, rounding_mode="floor") + (window - window // g),
            torch.div(p, g, rounding_mode="floor"),
        )
    if mode == "leaky":
        g = float(group_size)
        return p / g + (window - window / g), p / g
    raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")


# -- rules that choose G and w from the input length ---------------------------------------------------
# A rule is text, so a command line, a results file and the library can all name it:
#     "cover"   w = L // 4, G = the smallest that covers the input (the paper's choice; the default)
#     "f=F"     w = L // 8, G = the smallest with (F * L - w) * G + w >= n: the largest grouped distance
#               stays below F * L, where a model that retrieves poorly far out still retrieves (0 < F <= 1)
COVER_RULE = "cover"
DEFAULT_RULE = "cover"  # kept by the study in results/eval/smollm2-135m/study.md


def parse_rule(rule: str) -> tuple[float, int]:
    """``rule`` -> (reach F, window divisor): ``"cover"`` is (1, 4), ``"f=F"`` is (F, 8).
    ValueError, naming the accepted forms, for anything else."""
    text = rule.strip()
    if text == COVER_RULE:
        return 1.0, 4
    name, _, value = text.partition("=")
    try:
        reach = float(value) if name.strip() == "f" else math.nan
    except ValueError:
        reach = math.nan
    if not 0 < reach <= 1:  # also refuses nan
        raise ValueError(f"unknown rule {rule!r}: use 'cover' or 'f=F' with 0 < F <= 1 (e.g. f=0.5)")
    return reach, 8


def rule_name(rule: str) -> str:
    """The canonical spelling of ``rule`` (``f=0.50`` -> ``f=0.5``), so one rule has one name."""
    reach, divisor = parse_rule(rule)
    return COVER_RULE if divisor == 4 else f"f={reach:g}"


def rule_window(rule: str, pretrained_length: int) -> int:
    """The window ``rule`` uses unless one is given: ``L // 4`` for "cover", ``L // 8`` for "f=F"."""
    _, divisor = parse_rule(rule)
    return default_window(pretrained_length) if divisor == 4 else max(1, pretrained_length // divisor)


def rule_window_and_reach(rule: str, pretrained_length: int, window: int | None = None) -> tuple[int, int]:
    """(w, R) of ``rule`` for a model trained on ``pretrained_length`` tokens: its window (``window``
    overrides it) and its reach ``R = int(F * L)``, the bound on grouped distances. ValueError if the
    reach is not larger than the window (no G could cover anything)."""
    reach, _ = parse_rule(rule)
    w = rule_window(rule, pretrained_length) if window is None else window
    reach_tokens = int(reach * pretrained_length)
    if reach_tokens <= w:
        raise ValueError(f"rule {rule_name(rule)!r} keeps grouped distances below {reach_tokens} tokens, "
                         f"which must be more than the window w={w}; use a larger F or a smaller window")
    return w, reach_tokens


def choose_settings(length: int, pretrained_length: int, rule: str = COVER_RULE,
                    window: int | None = None) -> tuple[int, int]:
    """(G, w) that ``rule`` picks for an input of ``length`` tokens (``window`` overrides the rule's w).

    The window does not depend on ``length`` and G never decreases as ``length`` grows, so the same
    function can also choose G per query position (``length = position + 1``). An input that fits the
    trained length gets G = 1 (it runs as trained, exactly); past it G is the smallest with
    ``(R - w) * G + w >= length`` for the rule's reach R (:func:`rule_window_and_reach`), capped at
    DEFAULT_MAX_GROUP_SIZE."""
    w, reach_tokens = rule_window_and_reach(rule, pretrained_length, window)
    if length <= pretrained_length:
        return 1, w
    return choose_group_size(length, reach_tokens, w), w
