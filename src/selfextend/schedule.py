"""Which group size applies where in one sequence, and until when: the sequence's schedule.

A :class:`Schedule` answers, for every query position ``p`` of one sequence, the group size ``G`` its
far keys use (1 = nothing grouped: the model's own attention), and splits a range of positions into
runs that share one ``G``::

    settings            G of the query at position p
    ------------------  ---------------------------------------------------------------------
    group_size=G        G for p >= w
    automatic, floor    the rule's G for the sequence's length n (chosen once), for w <= p < the
                        limit (L - w) * G + w of that G; past it, the rule's G for p + 1 tokens
    automatic, leaky    the rule's G for p + 1 tokens (per position, as the baselines measured)
    rerope              infinity for p >= w (every far key at distance w)
    any                 1 for p < w: no key is w or more away yet

A sequence that fits the trained length gets ``G = 1`` from its length, so it runs exactly as the
plain model while it stays within ``L``. Per-position G alone (plain below L, larger G further on)
lost passkeys placed near L that the same G over the whole sequence found (results/eval, study).

The length ``n`` is the tokens of the sequence's first forward call, or the length announced with
:func:`selfextend.prompt_length` (a prompt in chunks; ``model.generate`` announces its prompts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .positions import DEFAULT_MAX_GROUP_SIZE, choose_settings, max_extended_length, rule_window_and_reach

if TYPE_CHECKING:
    from .settings import Settings


@dataclass(frozen=True)
class Schedule:
    """The group size at every position of one sequence (see the module docstring)."""

    settings: Settings
    chosen: float | None = None  # G chosen for the whole sequence by the rule (None: fixed G, or per position)

    @classmethod
    def for_sequence(cls, settings: Settings, length: int | None) -> Schedule:
        """The schedule of a sequence of ``length`` tokens (None: not known, G per position)."""
        if length is None or length < 1 or not settings.chooses_per_sequence:
            return cls(settings)
        return cls(settings, choose_settings(length, settings.pretrained_length, settings.rule, settings.window)[0])

    @property
    def _chosen_end(self) -> int:
        """First position past the range the sequence's chosen G serves (0 without one)."""
        s = self.settings
        return int(max_extended_length(s.pretrained_length, s.window, self.chosen)) if self.chosen else 0

    def _g(self, position: int) -> float:
        """G of a query at ``position``, before the window rule (positions below w group nothing)."""
        s = self.settings
        if s.mode == "rerope":
            return math.inf
        if s.group_size is not None:
            return s.group_size
        if position < self._chosen_end:
            return self.chosen
        return choose_settings(position + 1, s.pretrained_length, s.rule, s.window)[0]

    def group_at(self, position: int) -> float:
        """Group size of the query at ``position`` (0-based): 1 means nothing is grouped."""
        return 1 if position < self.settings.window else self._g(position)

    def group_for(self, length: int) -> float:
        """G of the last token of ``length`` tokens, as if the window had passed (what describe() says)."""
        return self._g(length - 1)

    def is_plain(self, last_position: int) -> bool:
        """True when no query up to ``last_position`` has a grouped key: nothing to change (G never
        decreases along a sequence, so the last query tells)."""
        return self.group_at(last_position) == 1

    def runs(self, first: int, last: int) -> list[tuple[int, int, float]]:
        """Positions ``first..last`` as maximal runs ``(start, end, G)`` (``end`` exclusive) that share
        one G, in order."""
        runs, p = [], first
        while p <= last:
            g = self.group_at(p)
            change = self._next_change(p)
            end = last + 1 if change is None else min(last + 1, change)
            if runs and runs[-1][2] == g and runs[-1][1] == p:
                runs[-1] = (runs[-1][0], end, g)
            else:
                runs.append((p, end, g))
            p = end
        return runs

    def _next_change(self, position: int) -> int | None:
        """A later position at which G may change (None: never)."""
        s = self.settings
        if position < s.window:
            return s.window
        if s.mode == "rerope" or s.group_size is not None:
            return None
        if position < self._chosen_end:
            return self._chosen_end
        g = self._g(position)
        if g == 1:
            return max(position + 1, s.pretrained_length)  # plain while the input fits
        if g >= DEFAULT_MAX_GROUP_SIZE:
            return None
        _, reach = rule_window_and_reach(s.rule, s.pretrained_length, s.window)
        return int((reach - s.window) * g + s.window)  # first position that needs G + 1
