"""SelfExtend's settings: one frozen type, checked when it is built, used by every part of the package.

    L  pretrained_length   the trained context (``config.max_position_embeddings`` by default)
    w  window              pairs closer than ``w`` keep ordinary positions; ``1 <= w < L``
    G  group_size          pairs ``w`` or more apart use floor-divided positions; None = chosen by
                           ``rule`` once per sequence (``for_sequence``), ``inf`` for rerope
       rule                how an automatic G (and the default w) is chosen (``positions``):
                           DEFAULT_RULE for SelfExtend, "cover" (the paper's) for leaky and rerope

``Settings.from_config(config, ...)`` fills the defaults from a model config (no weights needed), so
a command can refuse bad settings before it loads or runs anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .positions import (COVER_RULE, DEFAULT_MAX_GROUP_SIZE, DEFAULT_RULE, MODES, choose_settings, max_extended_length,
                        rule_name, rule_window, rule_window_and_reach)


BLOCK_ROWS = 4096  # queries per block: large blocks keep the kernel efficient; memory is O(block x keys)


class ContextLengthError(ValueError):
    """The input is longer than the extended limit ``(L - w) * G + w``."""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class Settings:
    """What one enabled model asks of its attention layers (validated in ``__post_init__``)."""

    pretrained_length: int
    window: int
    group_size: float | None = None  # None = auto: by `rule`, per sequence (per position for leaky); inf for rerope
    mode: str = "floor"
    log_scale: bool = False
    block_size: int = 1024  # queries per block of the exact merge
    rule: str = DEFAULT_RULE  # how an automatic G is chosen (canonical name, positions.rule_name)
    sequence_group: int | None = None  # G the rule chose for one sequence (see `for_sequence`); None = per position

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not _is_int(self.pretrained_length) or self.pretrained_length < 2:
            raise ValueError(f"pretrained_length must be an integer >= 2, got {self.pretrained_length!r}")
        if not _is_int(self.window) or not 1 <= self.window < self.pretrained_length:
            raise ValueError(f"window must be an integer with 1 <= window < pretrained length "
                             f"({self.pretrained_length}), got {self.window!r}")
        g = self.group_size
        if self.mode == "rerope":
            if g is not None and not (isinstance(g, float) and math.isinf(g)):
                raise ValueError("mode='rerope' uses an infinite group size; leave group_size=None")
            object.__setattr__(self, "group_size", math.inf)
        elif g is not None:
            if self.mode == "floor" and not _is_int(g):
                raise ValueError(f"group_size must be a whole number >= 1 (or None for automatic), got {g!r}")
            if isinstance(g, bool) or not isinstance(g, (int, float)) or not g >= 1 or math.isinf(g):
                raise ValueError(f"group_size must be a finite number >= 1 (or None for automatic), got {g!r}")
        if not isinstance(self.rule, str):
            raise ValueError(f"rule must be a string such as {DEFAULT_RULE!r} or {COVER_RULE!r}, got {self.rule!r}")
        object.__setattr__(self, "rule", rule_name(self.rule))  # one spelling per rule
        if self.group_size is None:  # the rule chooses G: its reach must exceed the window
            rule_window_and_reach(self.rule, self.pretrained_length, self.window)
        if not isinstance(self.log_scale, bool):
            raise ValueError(f"log_scale must be True or False, got {self.log_scale!r}")
        if not _is_int(self.block_size) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")

    @classmethod
    def from_config(cls, config, group_size: int | None = None, window: int | None = None,
                    pretrained_length: int | None = None, mode: str = "floor", log_scale: bool = False,
                    block_size: int | None = None, rule: str | None = None) -> Settings:
        """Settings for a model with this config; defaults: ``L = max_position_embeddings``, ``rule``
        :data:`~selfextend.positions.DEFAULT_RULE` for SelfExtend ("cover", the paper's, for the leaky
        and rerope variants), ``w`` the rule's window, ``block_size`` about :data:`BLOCK_ROWS`, a
        multiple of ``w - 1`` (near keys are processed in sub-blocks shorter than ``w``). A fixed
        ``group_size`` and a ``rule`` exclude each other. Raises ValueError naming what to change."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        if pretrained_length is None:
            pretrained_length = getattr(config, "max_position_embeddings", None)
            if not _is_int(pretrained_length):
                raise ValueError("the model config has no max_position_embeddings; pass pretrained_length=")
        if rule is not None and group_size is not None:
            raise ValueError(f"give group_size={group_size!r} or rule={rule!r}, not both: the rule chooses G")
        if rule is None:
            rule = DEFAULT_RULE if mode == "floor" else COVER_RULE
        if window is None and _is_int(pretrained_length) and pretrained_length >= 2 and isinstance(rule, str):
            window = rule_window(rule, pretrained_length)
        if block_size is None and _is_int(window):
            near = min(BLOCK_ROWS, max(1, window - 1))  # near keys go in sub-blocks shorter than w
            block_size = near * max(1, BLOCK_ROWS // near)
        return cls(pretrained_length, window, group_size, mode, log_scale, block_size, rule)

    # -- which group size applies where -----------------------------------------------------------
    def for_sequence(self, length: int) -> Settings:
        """These settings for one sequence whose first forward call holds ``length`` tokens.

        With an automatic G the rule chooses it once per sequence, from that length, and it serves
        every position of the sequence (those below L too, as a fixed G does) up to its extended limit
        ``(L - w) * G + w``; a sequence that outgrows it (decoding far past the prompt) goes on with
        the G the rule picks per position. ``length <= L`` gives G = 1: the plain model, exactly, while
        the sequence fits. Per-position G alone (plain below L, larger G further on) lost passkeys
        placed near L that the same G applied to the whole sequence found (README, Study)."""
        if not self.chooses_per_sequence or length < 1:
            return self
        g = choose_settings(length, self.pretrained_length, self.rule, self.window)[0]
        return replace(self, sequence_group=g)

    @property
    def chooses_per_sequence(self) -> bool:
        """Whether the rule chooses G once per sequence: an automatic G in SelfExtend's own mode (the leaky
        and rerope variants keep a G per position, as their baselines were measured)."""
        return self.group_size is None and self.mode == "floor"

    @property
    def _sequence_end(self) -> int:
        """First position past the range the sequence's G serves (0 without one)."""
        g = self.sequence_group
        return int(max_extended_length(self.pretrained_length, self.window, g)) if g else 0

    def group_size_at(self, position: int) -> float:
        """Group size used by a query at ``position`` (0-based)."""
        if self.group_size is not None:
            return self.group_size
        if position < self._sequence_end:
            return self.sequence_group
        return choose_settings(position + 1, self.pretrained_length, self.rule, self.window)[0]

    def next_group_change(self, position: int) -> int | None:
        """The first position after ``position`` whose automatic G differs from the G at ``position``;
        None when G never changes again (fixed, rerope, or at the cap)."""
        if self.group_size is not None:
            return None
        if position < self._sequence_end:
            return self._sequence_end
        g = self.group_size_at(position)
        if g == 1:
            return max(position + 1, self.pretrained_length)  # plain while the input fits
        if g >= DEFAULT_MAX_GROUP_SIZE:
            return None
        _, reach = rule_window_and_reach(self.rule, self.pretrained_length, self.window)
        return (reach - self.window) * g + self.window  # first position that needs G + 1

    def group_size_for(self, length: int) -> float:
        """Group size used by the last token of an input of ``length`` tokens."""
        return self.group_size_at(length - 1)

    def is_plain(self, last_position: int) -> bool:
        """True when no query up to ``last_position`` has a grouped key: nothing to change."""
        if last_position < self.window:
            return True
        return self.mode != "rerope" and self.group_size_at(last_position) == 1

    # -- the extended limit -----------------------------------------------------------------------
    @property
    def limit_group_size(self) -> float:
        """The G that sets the limit: the fixed G, or the largest automatic one."""
        return self.group_size if self.group_size is not None else DEFAULT_MAX_GROUP_SIZE

    @property
    def max_length(self) -> int | None:
        """Longest input whose distances stay inside the trained range; None = unbounded (rerope)."""
        if self.mode == "rerope":
            return None
        return int(max_extended_length(self.pretrained_length, self.window, self.limit_group_size))

    def raise_if_too_long(self, length: int) -> None:
        """Raise :class:`ContextLengthError`, stating the limit, if ``length`` tokens exceed it."""
        limit = self.max_length
        if limit is not None and length > limit:
            raise ContextLengthError(
                f"input has {length} tokens but SelfExtend's extended limit is {limit} tokens "
                f"((L - w) * G + w with L={self.pretrained_length}, w={self.window}, G={self.limit_group_size:g}); "
                "use a larger group size, a smaller window, or a shorter input")

    def describe(self, length: int | None = None) -> str:
        """One line: mode, L, w, G (for ``length`` if given) and the limit."""
        g = self.group_size_for(length) if length is not None else self.group_size
        g_text = f"auto({self.rule})" if g is None else ("inf" if math.isinf(g) else f"{g:g}")
        limit = self.max_length
        return (f"SelfExtend {self.mode} L={self.pretrained_length} w={self.window} G={g_text} "
                f"(limit {'none' if limit is None else limit})")
