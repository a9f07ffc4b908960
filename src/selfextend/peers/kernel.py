"""STRING and DCA attention for one batch row, in blocks of queries merged by log-sum-exp.

Each block of queries attends to a few key ranges, each at one pair of (query, key) rotations; every
range is one call of the fused softmax kernel (``selfextend.attention.attend``, which returns the
log-sum-exp) and the parts are merged exactly (``selfextend.attention.merge``), so a row is one softmax
over all its keys and memory stays O(block x keys): no ``L x L`` matrix is built.

Shapes (per batch row): q ``[Hq, Lq, D]``, k/v ``[Hkv, Lk, D]`` with key index = position (no padding),
q at positions ``first .. first + Lq - 1``. q and k arrive rotated at their ordinary positions; a vector
rotated at ``p`` moves to position ``t`` by one more rotation by ``t - p`` (RoPE composes), computed in
float32 from float64 angles.
"""

from __future__ import annotations

import math

import torch

from ..attention import attend, merge
from ..rope import rotate, rotation
from .formulas import DcaSettings, StringSettings


def rotated(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``x [H, n, D]`` rotated by ``delta [n]`` positions (x's dtype out)."""
    cos, sin = rotation(delta.to(x.device), inv_freq)
    return rotate(x.float(), cos, sin).to(x.dtype)


def band(q, k, v, first: int, keys: tuple[int, int], dist: tuple[float, float], scale: float, softcap=None):
    """Attention parts of the rows ``q [Hq, n, D]`` (positions ``first ..``) over the keys ``keys[0] ..
    keys[1]`` (inclusive; index = position) at distances ``dist[0] <= i - j <= dist[1]``.

    Keys every row sees go to one unmasked call; the square at each edge of the band is a triangle (the
    kernel's causal flag, on flipped rows and keys for the upper one); an edge cut short by the key range,
    or a band narrower than the block, gets an explicit ``[n, keys]`` mask. Returns ``[(out, lse)]``."""
    n = q.shape[1]
    dmin, dmax = dist
    p0, p1 = first, first + n - 1
    lo = keys[0] if math.isinf(dmax) else max(keys[0], p0 - int(dmax))
    hi = min(keys[1], p1 - int(dmin))
    if hi < lo:
        return []

    def call(a, b, how):
        ks, vs = k[:, a:b + 1], v[:, a:b + 1]
        if how == "all":
            return attend(q, ks, vs, scale, None, softcap)
        if how == "lower":
            return attend(q, ks, vs, scale, None, softcap, causal=True)
        if how == "upper":
            out, lse = attend(q.flip(1), ks.flip(1), vs.flip(1), scale, None, softcap, causal=True)
            return out.flip(1), lse.flip(1)
        d = torch.arange(p0, p1 + 1)[:, None] - torch.arange(a, b + 1)[None, :]
        return attend(q, ks, vs, scale, ((d >= dmin) & (d <= dmax)).to(q.device), softcap)

    full_lo = lo if math.isinf(dmax) else max(lo, p1 - int(dmax))  # keys every row sees: full_lo .. full_hi
    full_hi = min(hi, p0 - int(dmin))
    if full_lo > full_hi or dmax - dmin < n:  # a band narrower than the block: one masked call
        return [call(lo, hi, "mask")]
    spans = []
    if full_lo > lo:  # the far edge: row r sees key t >= r of the square p0 - dmax .. p1 - dmax
        if lo == p0 - dmax and full_lo < full_hi:
            spans.append((lo, full_lo, "upper"))
            full_lo += 1
        else:
            spans.append((lo, full_lo - 1, "mask"))
    if hi > full_hi:  # the near edge: row r sees key t <= r of the square p0 - dmin .. p1 - dmin
        if hi == p1 - dmin and full_hi >= full_lo:
            spans.append((full_hi, hi, "lower"))
            full_hi -= 1
        else:
            spans.append((full_hi + 1, hi, "mask"))
    if full_lo <= full_hi:
        spans.append((full_lo, full_hi, "all"))
    return [call(a, b, how) for a, b, how in spans]


def _blocks(start: int, stop: int, size: int, bounds=()):
    """``(a, b)`` row ranges covering ``start .. stop - 1`` in pieces of at most ``size``, split at ``bounds``."""
    cuts = sorted({start, stop, *[x for x in bounds if start < x < stop]})
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        for a in range(lo, hi, size):
            yield a, min(hi, a + size)


def _write(out, rows: slice, parts):
    out[:, rows] = merge(parts)[0].to(out.dtype)


def string_row(q, k, v, first: int, settings: StringSettings, inv_freq, scale, softcap=None, out=None):
    """STRING attention of one row: distances ``< S`` at ordinary positions, the others with the query
    moved back by ``S - W`` (so the pair is scored at ``d - S + W``); logits scaled by the attention
    factor squared. Arguments and shapes as in the module docstring; returns ``out [Hq, Lq, D]``."""
    lq = q.shape[1]
    out = torch.empty(q.shape[0], lq, v.shape[-1], dtype=q.dtype, device=q.device) if out is None else out
    s, w = settings.shift, settings.local
    scale = scale * settings.logit_scale(first + lq)
    block = max(1, min(settings.block_size, s - 1))
    for a, b in _blocks(0, lq, block):
        p0, p1 = first + a, first + b - 1
        parts = band(q[:, a:b], k, v, p0, (0, p1), (0, s - 1), scale, softcap)
        if p1 >= s:
            qs = rotated(q[:, a:b], torch.full((b - a,), float(w - s), dtype=torch.float64), inv_freq)
            parts += band(qs, k, v, p0, (0, p1), (s, math.inf), scale, softcap)
        _write(out, slice(a, b), parts)
    return out


def dca_keys(k, count: int, settings: DcaSettings, inv_freq):
    """The first ``count`` keys of ``k [Hkv, Lk, D]`` moved from position ``j`` to ``j mod chunk``."""
    pos = torch.arange(count, dtype=torch.float64)
    return rotated(k[:, :count], torch.remainder(pos, settings.chunk) - pos, inv_freq)


def dca_row(q, k, v, first: int, settings: DcaSettings, inv_freq, scale, length: int, softcap=None, out=None,
            chunk_keys=None):
    """DCA attention of one row: keys of the query's own chunk at ordinary positions (intra), keys of
    the previous chunk with the query at ``c + min(i mod c, w)`` (successive), keys of earlier chunks
    with the query at ``c + w`` (inter), keys at ``j mod c``; logits scaled by ``mscale(length) ** 2``.
    ``chunk_keys`` (optional) gives the keys before a position already moved to ``j mod c``:
    ``chunk_keys(count) -> [Hkv, count, D]``. Returns ``out [Hq, Lq, D]``."""
    lq = q.shape[1]
    out = torch.empty(q.shape[0], lq, v.shape[-1], dtype=q.dtype, device=q.device) if out is None else out
    c, w = settings.chunk, settings.local
    scale = scale * settings.logit_scale(length)
    last_chunk_start = ((first + lq - 1) // c) * c
    if chunk_keys is None:
        moved = dca_keys(k, last_chunk_start, settings, inv_freq) if last_chunk_start else None
        chunk_keys = lambda count: moved[:, :count]  # noqa: E731
    bounds = range(c * (first // c + 1), first + lq, c)  # chunk starts inside this call
    for a, b in _blocks(0, lq, settings.block_size, [x - first for x in bounds]):
        p0, p1 = first + a, first + b - 1
        start = (p0 // c) * c  # this block's chunk
        parts = band(q[:, a:b], k, v, p0, (start, p1), (0, math.inf), scale, softcap)  # intra
        if start:
            pos = torch.arange(p0, p1 + 1, dtype=torch.float64)
            offset = pos - start
            moved = chunk_keys(start)
            succ = rotated(q[:, a:b], c + torch.clamp(offset, max=w) - pos, inv_freq)
            parts.append(attend(succ, moved[:, start - c:], v[:, start - c:start], scale, None, softcap))
            if start > c:
                inter = rotated(q[:, a:b], (c + w) - pos, inv_freq)
                parts.append(attend(inter, moved[:, :start - c], v[:, :start - c], scale, None, softcap))
        _write(out, slice(a, b), parts)
    return out


def sliding_row(q, k, v, first: int, window: int, scale, softcap=None, block_size: int = 1024, out=None):
    """Causal attention over distances ``< window`` (a sliding-window layer), ordinary positions."""
    lq = q.shape[1]
    out = torch.empty(q.shape[0], lq, v.shape[-1], dtype=q.dtype, device=q.device) if out is None else out
    for a, b in _blocks(0, lq, max(1, min(block_size, window - 1))):
        _write(out, slice(a, b), band(q[:, a:b], k, v, first + a, (0, first + b - 1), (0, window - 1), scale, softcap))
    return out
