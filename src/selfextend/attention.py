"""Exact SelfExtend attention, computed in blocks of queries with a log-sum-exp merge.

For a block of queries at positions ``[P0, P1]`` (``w`` = window) the keys split into far keys, seen
at grouped positions, and near keys, seen at ordinary positions::

    key position:  0 ......... P0-w-1 | P0-w .. P1-w | P1-w+1 .. P0-1 | P0 ..... P1
    far  (grouped): all rows           | lower triangle
    near (ordinary):          P0-w+1 .. P1-w+1 | all rows      | lower triangle
                              upper triangle   |

    row P0:   g g g g g g g g g g g g  n n n n n n n n n n n n . . . .
    row P1:   g g g g g g g g g g g g  g g g g n n n n n n n n n n n n
              \\_ far: one unmasked + one causal call _/\\_ near: three calls _/

Far keys need one unmasked call and one causal call per block. Near keys are done in sub-blocks of
fewer than ``w`` rows, so that their band is an upper triangle (the kernel's causal flag on flipped
rows and keys), an unmasked middle, and a lower triangle. Every call is a fused softmax-attention
kernel that also returns the log-sum-exp: ``_scaled_dot_product_flash_attention_for_cpu`` on CPU, the
memory-efficient SDPA kernel on CUDA, an explicit tiled matmul elsewhere or with logit softcapping.
The partial results are merged with one softmax normalisation, so the result equals a single softmax
over the merged score row (paper Figure 3); memory stays O(block x keys) and the pairs scored are
exactly those plain causal attention scores.

Shapes (per batch row): q ``[Hq, Lq, D]``, k/v ``[Hkv, Lk, D]``, ``Hq = r * Hkv`` (GQA: query head
``h`` reads key head ``h // r``). q/k/v stay in the model's dtype (the kernels accumulate in float32);
merges accumulate in float32; rotations are computed in float32 with float64 angles.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .positions import grouped_positions, grouped_query_position
from .rope import Rotary
from .settings import Settings

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_EFFICIENT_CUDA = getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", None)
NEG_INF = float("-inf")
KEY_TILE = 4096  # keys per tile in the explicit fallback: bounds its memory to rows x 4096
KEYS_AHEAD = 64  # while decoding, grouped keys are rotated this many at a time (keys that exist already)


# --------------------------------------------------------------------------------------------
# softmax attention pieces that return their log-sum-exp, and their exact merge
# --------------------------------------------------------------------------------------------


def _attend_explicit(q, k, v, scale, mask, softcap):
    """Tiled attention in float32. q ``[Hq, n, D]``, k/v ``[Hkv, m, D]``, mask ``[n, m]`` bool
    (True = attend) or None. Returns out ``[Hq, n, D]``, lse ``[Hq, n]`` (float32)."""
    hq, n, d = q.shape
    hkv, m, _ = k.shape
    r = hq // hkv
    qr = q.float().reshape(hkv, r * n, d)
    parts = []
    for t0 in range(0, m, KEY_TILE):
        t1 = min(m, t0 + KEY_TILE)
        s = torch.matmul(qr, k[:, t0:t1].float().transpose(-1, -2)) * scale  # [Hkv, r*n, mt]
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        s = s.view(hkv, r, n, t1 - t0)
        if mask is not None:
            s = s.masked_fill(~mask[:, t0:t1], NEG_INF)
        lse = torch.logsumexp(s, dim=-1)  # [Hkv, r, n]
        p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
        out = torch.matmul(p.view(hkv, r * n, t1 - t0), v[:, t0:t1].float())  # [Hkv, r*n, D]
        parts.append((out.view(hq, n, -1), lse.view(hq, n)))
    return merge(parts)


def _attend_cuda(q, k, v, scale, bias, causal):
    """torch's memory-efficient SDPA kernel, which returns the log-sum-exp (CUDA, any float dtype).
    Unmasked calls fold the GQA group into the rows (no copy of k/v); others repeat k/v heads.

    Written for GPUs but not yet run on one (no GPU where this was developed)."""
    hq, n, d = q.shape
    hkv = k.shape[0]
    r = hq // hkv
    if r > 1 and bias is None and not causal:
        out, lse = _attend_cuda(q.reshape(hkv, r * n, d), k, v, scale, None, False)
        return out.view(hq, n, -1), lse.view(hq, n)
    if r > 1:
        k, v = k.repeat_interleave(r, 0), v.repeat_interleave(r, 0)
    attn_bias = None if bias is None else bias[None, None].expand(1, hq, n, k.shape[1])
    out, lse, *_ = _EFFICIENT_CUDA(q[None], k[None], v[None], attn_bias, True, 0.0, causal, scale=scale)
    return out[0], lse[0, :, :n]  # the kernel pads lse to a multiple of 32 rows


def attend(q, k, v, scale: float, mask: torch.Tensor | None = None, softcap: float | None = None,
           causal: bool = False):
    """Softmax attention of q over k/v.

    q ``[Hq, n, D]``, k/v ``[Hkv, m, D]`` (any float dtype, m >= 1), mask ``[n, m]`` bool (True =
    attend) or None; ``causal=True`` (square only, n == m) lets query i see keys 0..i. Returns
    ``(out [Hq, n, D] in q's dtype, or float32 on the explicit path; lse [Hq, n] float32)``; a row
    with no allowed key gets out = 0 and lse = -inf.

    Differentiable in q, k and v through both outputs (the log-sum-exp carries the weight of a part in
    a merge): with autograd on, the fused kernel runs forward and :class:`_AttendFunction` computes
    the gradients by recomputing scores in tiles (memory O(rows x tile), as flash attention does).
    """
    if causal:
        assert mask is None and q.shape[1] == k.shape[1]
    if needs_grad(q, k, v):
        return _AttendFunction.apply(q, k, v, scale, mask, softcap, causal)
    return _attend_forward(q, k, v, scale, mask, softcap, causal)


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records operations on any of ``tensors`` (then nothing may be written in place)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _attend_forward(q, k, v, scale, mask, softcap, causal):
    """:func:`attend` without autograd: the fused kernel where there is one, else the explicit path."""
    fused = softcap is None and (
        (q.device.type == "cpu" and _FLASH_CPU is not None) or (q.device.type == "cuda" and _EFFICIENT_CUDA is not None))
    if not fused:
        if causal:
            mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).tril()
        return _attend_explicit(q, k, v, scale, mask, softcap)
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, NEG_INF)
    if q.device.type == "cuda":
        out, lse = _attend_cuda(q, k, v, scale, bias, causal)
    else:
        out, lse = _FLASH_CPU(q[None], k[None], v[None], 0.0, causal, attn_mask=bias, scale=scale)
        out, lse = out[0], lse[0]
    if mask is not None:  # rows with no allowed key: the kernels report garbage there
        empty = ~mask.any(dim=-1)  # [n]
        lse = lse.masked_fill(empty, NEG_INF)
        out = out.masked_fill(empty[:, None], 0.0)
    return out, lse


GRAD_TILE = 1024  # rows and keys per tile of the backward pass: its memory is O(GRAD_TILE^2) per head


class _AttendFunction(torch.autograd.Function):
    """:func:`attend` with gradients for both of its outputs.

    With ``P = softmax(S)``, ``out = P V`` and ``lse = logsumexp(S)``, for incoming gradients ``dO``
    and ``g`` (of out and lse): ``dS = P * (dO V^T - rowsum(dO * out) + g)``; ``dQ = dS K scale``,
    ``dK = dS^T Q scale``, ``dV = P^T dO`` (times ``1 - tanh^2`` under logit softcapping). Scores
    are recomputed tile by tile from the saved q, k, v, out and lse."""

    @staticmethod
    def forward(ctx, q, k, v, scale, mask, softcap, causal):
        out, lse = _attend_forward(q, k, v, scale, mask, softcap, causal)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.scale, ctx.softcap, ctx.causal = scale, softcap, causal
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse, mask = ctx.saved_tensors
        hq, n, d = q.shape
        hkv, m, _ = k.shape
        r = hq // hkv
        as_rows = lambda x: x.float().reshape(hkv, r, n, -1)  # noqa: E731  [Hq, n, *] -> [Hkv, r, n, *]
        d_out = torch.zeros_like(out) if d_out is None else d_out
        d_lse = torch.zeros_like(lse) if d_lse is None else d_lse
        qr, do = as_rows(q), as_rows(d_out)
        row_term = (do * as_rows(out)).sum(-1) - d_lse.float().reshape(hkv, r, n)  # [Hkv, r, n]
        safe_lse = lse.float().masked_fill(torch.isinf(lse), 0.0).reshape(hkv, r, n)
        dq, dk, dv = torch.zeros_like(qr), torch.zeros(hkv, m, d), torch.zeros(hkv, m, v.shape[-1])
        for a in range(0, n, GRAD_TILE):
            b = min(n, a + GRAD_TILE)
            for t0 in range(0, m, GRAD_TILE):
                t1 = min(m, t0 + GRAD_TILE)
                kt, vt = k[:, t0:t1].float(), v[:, t0:t1].float()  # [Hkv, mt, D]
                s = torch.einsum("hrnd,hmd->hrnm", qr[:, :, a:b], kt) * ctx.scale
                if ctx.softcap is not None:
                    capped = torch.tanh(s / ctx.softcap)
                    s = capped * ctx.softcap
                allowed = _allowed(mask, ctx.causal, a, b, t0, t1, q.device)  # [rows, mt] or None
                if allowed is not None:
                    s = s.masked_fill(~allowed, NEG_INF)
                p = torch.exp(s - safe_lse[:, :, a:b, None])  # [Hkv, r, rows, mt]; 0 where masked
                dv[:, t0:t1] += torch.einsum("hrnm,hrnd->hmd", p, do[:, :, a:b])
                ds = p * (torch.einsum("hrnd,hmd->hrnm", do[:, :, a:b], vt) - row_term[:, :, a:b, None])
                if ctx.softcap is not None:
                    ds = ds * (1 - capped * capped)
                dq[:, :, a:b] += torch.einsum("hrnm,hmd->hrnd", ds, kt) * ctx.scale
                dk[:, t0:t1] += torch.einsum("hrnm,hrnd->hmd", ds, qr[:, :, a:b]) * ctx.scale
        return dq.reshape(hq, n, d).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _allowed(mask, causal, a, b, t0, t1, device):
    """Rows ``a..b-1`` x keys ``t0..t1-1`` of the pairs :func:`attend` allows (bool), None for all."""
    if mask is not None:
        return mask[a:b, t0:t1]
    if causal:
        return torch.arange(t0, t1, device=device)[None, :] <= torch.arange(a, b, device=device)[:, None]
    return None


def merge(parts, out: torch.Tensor | None = None):
    """Merge partial attentions ``[(out [H, n, D], lse [H, n]), ...]`` over disjoint key sets into
    the attention over their union (one softmax), accumulated in float32 (into ``out`` if given,
    a float32 ``[H, n, D]``). Returns ``(out, lse)``; rows no part saw come out as zeros."""
    if len(parts) == 1:
        o, lse = parts[0]
        return (o.float() if out is None else out.copy_(o)), lse
    lse = torch.logsumexp(torch.stack([part_lse for _, part_lse in parts]), dim=0)  # [H, n]
    safe = lse.masked_fill(torch.isinf(lse), 0.0)  # a row no part saw: every weight is exp(-inf) = 0
    in_place = not needs_grad(*(t for part in parts for t in part))  # autograd: the same sums, out of place
    total = None
    for o, part_lse in parts:
        weight = torch.exp(part_lse - safe).unsqueeze(-1)  # [H, n, 1] float32
        if total is None:
            total = torch.mul(o, weight, out=out) if in_place and out is not None else torch.mul(o, weight)
        else:
            total = total.addcmul_(o, weight) if in_place else torch.addcmul(total, o, weight)
    if out is not None and not in_place:
        out.copy_(total)
    return total, lse


class Span(NamedTuple):
    """An inclusive range ``lo..hi`` of positions or of distances ``p_i - p_j``."""

    lo: float
    hi: float


ANY_DISTANCE = Span(0, math.inf)


# --------------------------------------------------------------------------------------------
# rotations to grouped positions
# --------------------------------------------------------------------------------------------


def _positions(first_position: int, n: int, device=None) -> torch.Tensor:
    return torch.arange(first_position, first_position + n, device=device)


def _keys_to_grouped(k, first_position, shift, settings, group_size, rotary):
    """Keys ``k [H, n, D]`` at positions ``first_position ..`` (rotated at ``position + shift``) moved to
    their grouped positions ``p // G``."""
    pos = _positions(first_position, k.shape[1], k.device)
    _, target = grouped_positions(pos, settings.window, group_size, settings.mode)
    return rotary.rotate_by(k, target - (pos + shift).to(torch.float64))


def _queries_to_grouped(q, first_position, shift, settings, group_size, rotary):
    """Queries ``q [H, n, D]`` at positions ``first_position ..`` (rotated at ``position + shift``)
    moved to their grouped positions ``p // G + w - w // G``."""
    pos = _positions(first_position, q.shape[1], q.device)
    target, _ = grouped_positions(pos, settings.window, group_size, settings.mode)
    return rotary.rotate_by(q, target - (pos + shift).to(torch.float64))


class GroupedKeys:
    """Keys of one layer and batch row rotated to their grouped positions for one group size.

    Grouped key positions never change once a key exists, so during decoding the keys are rotated
    once and appended to (O(new keys) per step), instead of re-rotating the whole cache at every
    step as the official implementation does. Within one call the same object serves all blocks.
    Key index ``first`` is at position ``first_position``; the model rotated every key at its
    position ``+ shift`` (``shift != 0`` when ``position_ids`` do not start at the first real token).
    The buffer has the keys' dtype. Whoever keeps it between calls must :meth:`truncate` it when the
    keys it was built from change.
    """

    def __init__(self, first: int, first_position: int, shift: int, group_size: float):
        self.first, self.first_position, self.shift, self.group_size = first, first_position, shift, group_size
        self.buffer = None  # [Hkv, capacity, D]
        self.count = 0  # keys held, starting at key index `first`
        self.rotated = 0  # keys rotated in this object's life (a statistic: decoding adds one per step)

    def serves(self, first: int, first_position: int, shift: int) -> bool:
        return (self.first, self.first_position, self.shift) == (first, first_position, shift)

    def truncate(self, valid_keys: int) -> None:
        """Forget rotated keys with index ``>= valid_keys`` (the cache was cropped or rewritten there)."""
        self.count = max(0, min(self.count, valid_keys - self.first))

    def get(self, k: torch.Tensor, last: int, settings: Settings, rotary: Rotary,
            available: int | None = None) -> torch.Tensor:
        """Keys ``first..last`` (inclusive) of ``k [Hkv, Lk, D]`` at grouped positions: ``[Hkv, last - first + 1, D]``.

        With ``available`` (the index of the newest key that exists), keys past ``last`` up to it are
        rotated ahead, up to :data:`KEYS_AHEAD` at a time, so a decode step rarely rotates anything."""
        need = last - self.first + 1
        if self.count < need:
            upto = need if available is None else max(need, min(need + KEYS_AHEAD - 1, available - self.first + 1))
            start = self.first + self.count
            new = _keys_to_grouped(k[:, start : self.first + upto], self.first_position + self.count, self.shift,
                                   settings, self.group_size, rotary)  # [Hkv, upto - count, D]
            if needs_grad(new) or (self.buffer is not None and self.buffer.requires_grad):
                # autograd: earlier slices of the buffer may be saved for backward; never write into it
                self.buffer = new if not self.count else torch.cat((self.buffer[:, : self.count], new), dim=1)
                self.rotated += upto - self.count
                self.count = upto
                return self.buffer[:, :need]
            if self.buffer is None or self.buffer.shape[1] < upto:  # grow by 1/8: at most 12.5% unused
                capacity = upto + max(KEYS_AHEAD, self.count // 8) if self.count else upto
                grown = torch.empty(k.shape[0], capacity, k.shape[2], dtype=k.dtype, device=k.device)
                if self.count:
                    grown[:, : self.count] = self.buffer[:, : self.count]
                self.buffer = grown
            self.buffer[:, self.count : upto] = new
            self.rotated += upto - self.count
            self.count = upto
        return self.buffer[:, :need]


def grouped_keys(key_cache: dict, group_size: float, first: int, first_position: int, shift: int) -> GroupedKeys:
    """The :class:`GroupedKeys` of ``key_cache`` (group size -> GroupedKeys) for this row layout, made
    anew if the layout changed. Smaller group sizes are dropped: positions only grow, so an automatic
    G never returns to a smaller value (unless the cache is cut back, and then they are rebuilt)."""
    keys = key_cache.get(group_size)
    if keys is None or not keys.serves(first, first_position, shift):
        keys = key_cache[group_size] = GroupedKeys(first, first_position, shift, group_size)
        for g in [g for g in key_cache if g < group_size]:
            del key_cache[g]
    return keys


# --------------------------------------------------------------------------------------------
# blocks of rows and the pieces of keys they attend to
# --------------------------------------------------------------------------------------------


def _group_of(settings, position):
    """(group size, first later position where it changes, or None) for a query at ``position``."""
    w = settings.window
    if position < w and settings.group_size_at(position) != 1:  # nothing grouped yet, G > 1 from w on
        return 1, w
    g = 1 if settings.is_plain(position) else settings.group_size_at(position)
    return g, settings.next_group_change(position)


def _segments(settings, first_query_position, start, lq):
    """Split rows ``start..lq-1`` into ``(row_start, row_end, group_size)`` blocks of about
    ``block_size`` rows (at most 1.25x) that share one group size."""
    segments, row = [], start
    while row < lq:
        g, change = _group_of(settings, first_query_position + row)
        end = min(lq, row + settings.block_size)
        if lq - end < settings.block_size // 4:
            end = lq  # no small last block: a few rows would cost as many kernel calls as a full one
        if change is not None:
            end = min(end, change - first_query_position)
        assert end > row, "segments must advance"
        segments.append((row, end, g))
        row = end
    return segments


def _pieces(q, k, v, rows, keys: Span, cuts, allowed: Span, key_offset, scale, softcap):
    """Attention of query rows ``q [Hq, n, D]`` (positions ``rows [n]``, contiguous) over the keys at
    positions ``keys.lo..keys.hi`` of ``k``/``v [Hkv, Lk, D]`` (key at position ``p`` has index
    ``p + key_offset``), restricted to the distances ``allowed.lo <= p_i - p_j <= allowed.hi``, as
    pieces split after each position in ``cuts``. A piece runs

    * unmasked when every pair in it is allowed,
    * with the kernel's causal flag when it is a square whose allowed pairs form the lower
      triangle (``p_j - a <= p_i - p0``), or on the flipped square when they form the upper one,
    * with an explicit ``[rows, keys]`` mask otherwise (only at sequence starts or tiny windows).

    Returns a list of ``(out [Hq, n, D], lse [Hq, n])``, one per piece that has an allowed pair."""
    lo, hi = keys
    dmin, dmax = allowed
    p0, p1 = int(rows[0]), int(rows[-1])
    bounds = sorted({lo - 1, hi, *[c for c in cuts if lo - 1 < c < hi]})
    plan = []  # (first key position, last key position, how)
    for a_excl, b in zip(bounds[:-1], bounds[1:]):
        a = a_excl + 1
        if b < a or p1 - a < dmin or p0 - b > dmax:  # empty, or no pair allowed
            continue
        square = b - a == p1 - p0
        if p0 - b >= dmin and p1 - a <= dmax:
            how = "all"
        elif square and dmin == p0 - a and p1 - a <= dmax:
            how = "lower"  # lower triangle: the kernel's causal flag
        elif square and dmax == p0 - a and p0 - b >= dmin:
            how = "upper"  # upper triangle: causal once rows and keys are flipped
        else:
            how = "mask"
        if plan and how == "all" and plan[-1][2] == "all" and plan[-1][1] == a - 1:
            plan[-1] = (plan[-1][0], b, "all")  # one call for adjacent unmasked pieces
        else:
            plan.append((a, b, how))
    parts = []
    for a, b, how in plan:
        ks, vs = k[:, a + key_offset : b + key_offset + 1], v[:, a + key_offset : b + key_offset + 1]
        if how == "all":
            parts.append(attend(q, ks, vs, scale, None, softcap))
        elif how == "lower":
            parts.append(attend(q, ks, vs, scale, None, softcap, causal=True))
        elif how == "upper":
            out, lse = attend(q.flip(1), ks.flip(1), vs.flip(1), scale, None, softcap, causal=True)
            parts.append((out.flip(1), lse.flip(1)))
        else:
            d = rows[:, None] - torch.arange(a, b + 1)[None, :]
            parts.append(attend(q, ks, vs, scale, (d >= dmin) & (d <= dmax), softcap))
    return parts


def _write(out: torch.Tensor, rows: slice, parts) -> None:
    """Merge ``parts`` (all over the same rows) into ``out[:, rows]`` (float32 directly, else cast)."""
    target = out[:, rows]
    if out.dtype == torch.float32 and len(parts) > 1:
        merge(parts, out=target)
    else:
        target.copy_(merge(parts)[0])


def _near_blocks(q, k, v, positions, s, e, first_pos, window, key_offset, scale, softcap, far, out):
    """Rows ``s..e-1`` (positions ``positions[s:e]``) over their near keys, distances ``0..window-1``,
    in sub-blocks of fewer than ``window`` rows (so each band is an upper triangle, an unmasked
    middle and a lower triangle); each sub-block is merged with its rows of the ``far`` parts
    (``[(out [Hq, e - s, D], lse [Hq, e - s])]``) into ``out [Hq, Lq, D]``."""
    blocks = math.ceil((e - s) / max(1, window - 1))
    step = math.ceil((e - s) / blocks)  # even sub-blocks, each of at most window - 1 rows
    for a in range(s, e, step):
        b = min(e, a + step)
        pa, pb = int(positions[a]), int(positions[b - 1])
        keys = Span(max(first_pos, pa - window + 1), pb)
        near = _pieces(q[:, a:b], k, v, positions[a:b], keys, [pb - window + 1, pa - 1], Span(0, window - 1),
                       key_offset, scale, softcap)
        rows_of_far = [(o[:, a - s : b - s], lse[:, a - s : b - s]) for o, lse in far]
        _write(out, slice(a, b), rows_of_far + near)


def _merge_two(a, b) -> torch.Tensor:
    """Merge two partial attentions over disjoint key sets, both seen by every row: ``out_b + w
    (out_a - out_b)`` with ``w = sigmoid(lse_a - lse_b)``, the share of the first. Float32."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    share = torch.sigmoid(lse_a - lse_b).unsqueeze(-1)  # [H, n, 1]
    return torch.lerp(out_b.float(), out_a.float(), share)


def _decode_step(q, k, v, p, key_offset, shift, settings, rotary, scale, softcap, key_cache):
    """One query ``q [Hq, 1, D]`` at position ``p`` with grouped and neighbor keys both present: two
    kernel calls and one merge (the common decode step). Returns ``[Hq, 1, D]`` float32, or None when
    the general path is needed (a query near the start, or nothing grouped)."""
    w = settings.window
    first_key = max(0, key_offset)
    first_pos = first_key - key_offset
    if p < 0 or p - w < first_pos or settings.is_plain(p):
        return None
    g = settings.group_size_at(p)
    last_grouped = p - w + key_offset  # index of the last key at distance >= w
    kg = grouped_keys(key_cache, g, first_key, first_pos, shift).get(k, last_grouped, settings, rotary,
                                                                     available=p + key_offset)
    delta = grouped_query_position(p, w, g, settings.mode) - (p + shift)
    qg = rotary.rotate_by(q, delta)
    far = attend(qg, kg, v[:, first_key : last_grouped + 1], scale, None, softcap)
    near = attend(q, k[:, last_grouped + 1 : p + key_offset + 1], v[:, last_grouped + 1 : p + key_offset + 1],
                  scale, None, softcap)
    return _merge_two(far, near)


def selfextend_row(q, k, v, first_query_position, key_offset, settings, rotary, scale, softcap=None,
                   key_cache=None, shift=0, out=None):
    """SelfExtend attention for one batch row.

    q ``[Hq, Lq, D]`` at positions ``first_query_position + arange(Lq)``; k/v ``[Hkv, Lk, D]`` where
    key index ``j`` is at position ``j - key_offset`` (negative = left padding, never attended).
    The model rotated q and k at ``position + shift``. ``key_cache`` maps group size ->
    GroupedKeys (pass a persistent dict while decoding). Writes ``[Hq, Lq, D]`` into ``out`` (any
    float dtype; made in q's dtype if None), zeros for left-padding rows, and returns it.
    """
    key_cache = {} if key_cache is None else key_cache
    lq = q.shape[1]
    if out is None:
        out = torch.empty(q.shape[0], lq, v.shape[-1], dtype=q.dtype, device=q.device)
    if lq == 1 and not settings.log_scale:
        fast = _decode_step(q, k, v, first_query_position, key_offset, shift, settings, rotary, scale, softcap,
                            key_cache)
        if fast is not None:
            return out.copy_(fast)
    first_key = max(0, key_offset)  # index of the first real key (position 0 or later)
    first_pos = first_key - key_offset  # its position
    positions = _positions(first_query_position, lq, q.device)
    if settings.log_scale:
        factor = torch.clamp(torch.log(positions.double() + 1) / math.log(settings.pretrained_length), min=1.0)
        q = (q.float() * factor.float()[None, :, None]).to(q.dtype)

    # Rows that are left padding (negative position) stay zero; split the rest into blocks of
    # rows that share one group size (auto mode: G grows with the query position).
    start = max(0, -first_query_position)
    out[:, :start] = 0
    w = settings.window
    for s, e, g in _segments(settings, first_query_position, start, lq):
        p0, p1 = first_query_position + s, first_query_position + e - 1
        rows = positions[s:e]
        if g == 1:  # ordinary causal attention: keys [first_pos, p1], any distance >= 0
            _write(out, slice(s, e), _pieces(q[:, s:e], k, v, rows, Span(first_pos, p1), [p0 - 1], ANY_DISTANCE,
                                             key_offset, scale, softcap))
            continue
        far = []  # keys [first_pos, p1 - w] at grouped positions (distance >= w)
        if p1 - w >= first_pos:
            last = p1 - w + key_offset
            kg = grouped_keys(key_cache, g, first_key, first_pos, shift).get(k, last, settings, rotary)
            qg = _queries_to_grouped(q[:, s:e], p0, shift, settings, g, rotary)
            vg = v[:, first_key : last + 1]  # kg/vg index 0 is position first_pos
            far = _pieces(qg, kg, vg, rows, Span(first_pos, p1 - w), [p0 - w - 1], Span(w, math.inf), -first_pos,
                          scale, softcap)
        _near_blocks(q, k, v, positions, s, e, first_pos, w, key_offset, scale, softcap, far, out)
    return out


def sliding_window_row(q, k, v, first_query_position, key_offset, window, scale, softcap=None, out=None):
    """Causal attention restricted to distances ``< window`` (a sliding-window layer), in blocks:
    memory O(block x (window + block)) instead of the ``[Lq, Lk]`` mask the original path builds.
    Arguments as for :func:`selfextend_row`; ordinary positions only (nothing is grouped)."""
    lq = q.shape[1]
    if out is None:
        out = torch.empty(q.shape[0], lq, v.shape[-1], dtype=q.dtype, device=q.device)
    first_pos = max(0, key_offset) - key_offset
    positions = _positions(first_query_position, lq, q.device)
    start = max(0, -first_query_position)
    out[:, :start] = 0
    _near_blocks(q, k, v, positions, start, lq, first_pos, window, key_offset, scale, softcap, [], out)
    return out
