"""SelfExtend's settings: what the user chose, checked when built, used by every part of the package.

    L  pretrained_length   the trained context (``config.max_position_embeddings`` by default)
    w  window              pairs closer than ``w`` keep ordinary positions; ``1 <= w < L``
    G  group_size          pairs ``w`` or more apart use floor-divided positions: a whole number for
                           "floor", any number >= 1 for "leaky"; None lets ``rule`` choose it (once
                           per sequence for "floor", per position for "leaky"); always None for
                           "rerope", whose G is infinite
       rule                how an automatic G (and the default w) is chosen (``positions``):
                           DEFAULT_RULE, SelfExtend's default, unless given (every mode)
       block_size          queries per block of the kernel (None: the kernel's default for w)

Which G applies at which position of a sequence is its :class:`~selfextend.schedule.Schedule`.
``Settings.from_config(config, ...)`` fills the defaults from a model config (no weights needed), so
a command can refuse bad settings before it loads or runs anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .positions import (DEFAULT_MAX_GROUP_SIZE, DEFAULT_RULE, MODES, max_extended_length, rule_name, rule_window,
                        rule_window_and_reach)
from .schedule import Schedule


class ContextLengthError(ValueError):
    """The input is longer than the extended limit ``(L - w) * G + w``."""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class Settings:
    """What one enabled model asks of its attention layers (validated in ``__post_init__``)."""

    pretrained_length: int
    window: int
    group_size: float | None = None  # fixed G; None = chosen by `rule` (and always None for rerope)
    mode: str = "floor"
    log_scale: bool = False
    block_size: int | None = None  # queries per kernel block; None = the kernel's default for the window
    rule: str = DEFAULT_RULE  # how an automatic G is chosen (canonical name, positions.rule_name)

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
            if g is not None:
                raise ValueError("mode='rerope' uses an infinite group size; leave group_size=None")
        elif g is not None:
            if self.mode == "floor" and not _is_int(g):
                raise ValueError(f"group_size must be a whole number >= 1 (or None for automatic), got {g!r}")
            if isinstance(g, bool) or not isinstance(g, (int, float)) or not g >= 1 or math.isinf(g):
                raise ValueError(f"group_size must be a finite number >= 1 (or None for automatic), got {g!r}")
        if not isinstance(self.rule, str):
            raise ValueError(f"rule must be a string such as 'cover' or 'f=0.5', got {self.rule!r}")
        object.__setattr__(self, "rule", rule_name(self.rule))  # one spelling per rule
        if self.group_size is None and self.mode != "rerope":  # the rule chooses G: its reach must exceed the window
            rule_window_and_reach(self.rule, self.pretrained_length, self.window)
        if not isinstance(self.log_scale, bool):
            raise ValueError(f"log_scale must be True or False, got {self.log_scale!r}")
        if self.block_size is not None and (not _is_int(self.block_size) or self.block_size < 1):
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")

    @classmethod
    def from_config(cls, config, group_size: int | None = None, window: int | None = None,
                    pretrained_length: int | None = None, mode: str = "floor", log_scale: bool = False,
                    block_size: int | None = None, rule: str | None = None) -> Settings:
        """Settings for a model with this config; defaults: ``L = max_position_embeddings``, ``rule``
        SelfExtend's default :data:`~selfextend.positions.DEFAULT_RULE` (in every mode), ``w`` the
        rule's window. A fixed ``group_size`` and a ``rule`` exclude each other. Raises ValueError
        naming what to change."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        if pretrained_length is None:
            pretrained_length = getattr(config, "max_position_embeddings", None)
            if not _is_int(pretrained_length):
                raise ValueError("the model config has no max_position_embeddings; pass pretrained_length=")
        if rule is not None and group_size is not None:
            raise ValueError(f"give group_size={group_size!r} or rule={rule!r}, not both: the rule chooses G")
        if rule is None:
            rule = DEFAULT_RULE
        if window is None and _is_int(pretrained_length) and pretrained_length >= 2 and isinstance(rule, str):
            window = rule_window(rule, pretrained_length)
        return cls(pretrained_length, window, group_size, mode, log_scale, block_size, rule)

    @property
    def chooses_per_sequence(self) -> bool:
        """Whether the rule chooses G once per sequence: an automatic G in SelfExtend's own mode (the leaky
        variant keeps a G per position, as its baseline was measured)."""
        return self.group_size is None and self.mode == "floor"

    def group_size_for(self, length: int) -> float:
        """Group size of the last token of a sequence of ``length`` tokens (``inf`` for rerope)."""
        return Schedule.for_sequence(self, length).group_for(length)

    # -- the extended limit -----------------------------------------------------------------------
    @property
    def max_length(self) -> int | None:
        """Longest input whose distances stay inside the trained range (at the largest automatic G,
        64, when G is automatic); None = unbounded (rerope)."""
        if self.mode == "rerope":
            return None
        g = self.group_size if self.group_size is not None else DEFAULT_MAX_GROUP_SIZE
        return int(max_extended_length(self.pretrained_length, self.window, g))

    def raise_if_too_long(self, length: int) -> None:
        """Raise :class:`ContextLengthError`, stating the limit, if ``length`` tokens exceed it."""
        limit = self.max_length
        if limit is not None and length > limit:
            g = self.group_size if self.group_size is not None else DEFAULT_MAX_GROUP_SIZE
            raise ContextLengthError(
                f"input has {length} tokens but SelfExtend's extended limit is {limit} tokens "
                f"((L - w) * G + w with L={self.pretrained_length}, w={self.window}, G={g:g}); "
                "use a larger group size, a smaller window, or a shorter input")

    def describe(self, length: int | None = None) -> str:
        """One line: mode, L, w, G (for ``length`` if given) and the limit."""
        g = self.group_size_for(length) if length is not None else self.group_size
        if g is None:
            g_text = "inf" if self.mode == "rerope" else f"auto({self.rule})"
        else:
            g_text = "inf" if math.isinf(g) else f"{g:g}"
        limit = self.max_length
        return (f"SelfExtend {self.mode} L={self.pretrained_length} w={self.window} G={g_text} "
                f"(limit {'none' if limit is None else limit})")
