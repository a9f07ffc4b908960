"""Rotations by whole position deltas, from one table built per engine (worker process).

Every rotation the vLLM backends make moves a vector by a whole number of positions: a new key from
``j`` to its grouped position ``j // G``, a query from ``p`` to ``p // G + w - w // G``, a stored
neighbour key back from ``j // G`` to ``j``. So the cosines and sines are looked up, not recomputed
each step: :class:`RotationTable` holds ``cos(d * f)`` and ``sin(d * f)`` for ``d = 0 .. n`` (angles
in float64, stored in float32), transposed -- one row per rotary frequency -- because that is what the
C++ kernels read (16 consecutive deltas are one vector load). A negative delta uses
``cos(-x) = cos x``, ``sin(-x) = -sin x``. The table grows (doubling) when a longer context needs it.

Pairs are rotate-half ``(i, i + rotary_dim / 2)``, vLLM's GPT-NeoX style (the only one the plugin
accepts); dims past ``rotary_dim`` (partial rotary) pass through.
"""

from __future__ import annotations

import torch

from ..rope import Rotary

PADDING = 16  # columns past the last delta: the C++ kernels load 16 at a time


class RotationTable:
    """cos/sin of rotations by ``0 .. positions`` for frequencies ``inv_freq [rotary_dim / 2]``."""

    def __init__(self, inv_freq: torch.Tensor, positions: int):
        self.inv_freq = inv_freq.detach().to("cpu", torch.float64)
        self.rotary = Rotary(self.inv_freq)  # rotate-half pairs: the arithmetic of the rotation
        self.cos_t = self.sin_t = torch.empty(0)
        self.grow(positions)

    @property
    def half(self) -> int:
        return self.inv_freq.numel()

    @property
    def positions(self) -> int:
        """The largest delta the table covers."""
        return self.cos_t.shape[1] - PADDING - 1

    def grow(self, positions: int) -> None:
        """Cover deltas up to at least ``positions`` (rebuilt at twice the size when it must grow)."""
        if self.cos_t.numel() and positions <= self.positions:
            return
        size = max(positions, 2 * self.positions if self.cos_t.numel() else positions) + PADDING + 1
        angles = self.inv_freq[:, None] * torch.arange(size, dtype=torch.float64)[None, :]  # [rd/2, size]
        self.cos_t = angles.cos().to(torch.float32).contiguous()
        self.sin_t = angles.sin().to(torch.float32).contiguous()

    def lookup(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[n, rotary_dim / 2]`` (float32) of rotations by the whole deltas ``delta [n]``."""
        delta = delta.to("cpu", torch.long)
        self.grow(int(delta.abs().max()) if delta.numel() else 0)
        cos = self.cos_t[:, delta.abs()].T  # [n, rd/2]
        sin = self.sin_t[:, delta.abs()].T * torch.sign(delta).to(torch.float32)[:, None]
        return cos, sin

    def rotate(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``x [n, H, D]`` with row ``t`` rotated by ``delta[t]`` positions: float32 maths, x's dtype out."""
        cos, sin = self.lookup(delta)
        return self.rotary.rotate(x, cos.to(x.device)[:, None], sin.to(x.device)[:, None])
