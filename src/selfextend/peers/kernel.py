"""STRING and DCA attention for one batch row, on SelfExtend's kernel pieces.

Each block of queries attends to a few key ranges, each at one pair of (query, key) rotations; every
range is one call of the fused softmax kernel that returns its log-sum-exp (``attention.pieces``, the
triangles and bands SelfExtend itself uses) and the parts are merged exactly, so a row is one softmax
over all its keys and memory stays O(block x keys): no ``L x L`` matrix is built.

Rows arrive as :class:`~selfextend.attention.Row` with key index = position (unpadded sequences): q and
k rotated at their ordinary positions; a vector rotated at ``p`` moves to position ``t`` by one more
rotation by ``t - p`` (RoPE composes), computed in float32 from float64 angles (``rope.Rotary``).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..attention import ANY_DISTANCE, Keys, Row, Span, attend, near_blocks, pieces, write_merged
from ..rope import Rotary
from .formulas import DcaSettings, StringSettings


def _blocks(start: int, stop: int, size: int, bounds=()):
    """``(a, b)`` row ranges covering ``start .. stop - 1`` in pieces of at most ``size``, split at ``bounds``."""
    cuts = sorted({start, stop, *[x for x in bounds if start < x < stop]})
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        for a in range(lo, hi, size):
            yield a, min(hi, a + size)


def _output(row: Row, out: torch.Tensor | None) -> torch.Tensor:
    return torch.empty(row.q.shape[0], row.q.shape[1], row.v.shape[-1], dtype=row.q.dtype,
                       device=row.q.device) if out is None else out


def string_row(row: Row, settings: StringSettings, rotary: Rotary, out: torch.Tensor | None = None) -> torch.Tensor:
    """STRING attention of one row: distances ``< S`` at ordinary positions (near keys, in bands as
    SelfExtend's neighbours), the others with the query moved back by ``S - W`` (so the pair is scored at
    ``d - S + W``); logits scaled by the attention factor squared. Returns ``out [Hq, Lq, D]``."""
    out = _output(row, out)
    s, w = settings.shift, settings.local
    row = replace(row, scale=row.scale * settings.logit_scale(row.first_position + row.q.shape[1]))
    keys = Keys(row.k, row.v, 0)
    for a, b in _blocks(0, row.q.shape[1], settings.block_size):
        p0, p1 = row.first_position + a, row.first_position + b - 1
        far = []  # keys 0 .. p1 - S, distance >= S: the query moved back by S - W
        if p1 >= s:
            shifted = rotary.rotate_by(row.q[:, a:b], torch.full((b - a,), float(w - s), dtype=torch.float64))
            far = pieces(row, shifted, Span(p0, p1), keys, Span(0, p1 - s), [p0 - s - 1], Span(s, math.inf))
        near_blocks(row, a, b, s, far, out)
    return out


def dca_keys(k: torch.Tensor, count: int, settings: DcaSettings, rotary: Rotary) -> torch.Tensor:
    """The first ``count`` keys of ``k [Hkv, Lk, D]`` moved from position ``j`` to ``j mod chunk``."""
    pos = torch.arange(count, dtype=torch.float64)
    return rotary.rotate_by(k[:, :count], torch.remainder(pos, settings.chunk) - pos)


def dca_row(row: Row, settings: DcaSettings, rotary: Rotary, length: int, out: torch.Tensor | None = None,
            chunk_keys=None) -> torch.Tensor:
    """DCA attention of one row: keys of the query's own chunk at ordinary positions (intra), keys of
    the previous chunk with the query at ``c + min(i mod c, w)`` (successive), keys of earlier chunks
    with the query at ``c + w`` (inter), keys at ``j mod c``; logits scaled by ``mscale(length) ** 2``.
    ``chunk_keys`` (optional) gives the keys before a position already moved to ``j mod c``:
    ``chunk_keys(count) -> [Hkv, count, D]``. Returns ``out [Hq, Lq, D]``."""
    out = _output(row, out)
    lq, first = row.q.shape[1], row.first_position
    c, w = settings.chunk, settings.local
    row = replace(row, scale=row.scale * settings.logit_scale(length))
    last_chunk_start = ((first + lq - 1) // c) * c
    if chunk_keys is None:
        moved = dca_keys(row.k, last_chunk_start, settings, rotary) if last_chunk_start else None
        chunk_keys = lambda count: moved[:, :count]  # noqa: E731
    bounds = range(c * (first // c + 1), first + lq, c)  # chunk starts inside this call
    for a, b in _blocks(0, lq, settings.block_size, [x - first for x in bounds]):
        p0, p1 = first + a, first + b - 1
        start = (p0 // c) * c  # this block's chunk
        parts = pieces(row, row.q[:, a:b], Span(p0, p1), Keys(row.k, row.v, 0), Span(start, p1), [p0 - 1],
                       ANY_DISTANCE)  # intra
        if start:
            pos = torch.arange(p0, p1 + 1, dtype=torch.float64)
            moved = chunk_keys(start)
            successive = rotary.rotate_by(row.q[:, a:b], c + torch.clamp(pos - start, max=w) - pos)
            parts.append(attend(successive, moved[:, start - c:], row.v[:, start - c:start], row.scale, None,
                                row.softcap))
            if start > c:
                inter = rotary.rotate_by(row.q[:, a:b], (c + w) - pos)
                parts.append(attend(inter, moved[:, :start - c], row.v[:, :start - c], row.scale, None, row.softcap))
        write_merged(out, slice(a, b), parts)
    return out
