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

This file is arithmetic only: it receives one batch row's tensors and positions (:class:`Row`), the
sequence's :class:`~selfextend.schedule.Schedule` (which G where), the layer's
:class:`~selfextend.rope.Rotary`, and a function that returns keys at grouped positions (kept
between calls by :mod:`selfextend.sequence`, or made fresh).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from collections.abc import Callable
from dataclasses import dataclass

from .positions import grouped_positions
from .rope import Rotary
from .schedule import Schedule

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_EFFICIENT_CUDA = getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", None)
NEG_INF = float("-inf")

# -- kernel constants ---------------------------------------------------------------------------------
BLOCK_ROWS = 4096  # queries per block (about): large blocks keep the kernel efficient; memory O(block x keys)
KEY_TILE = 4096  # keys per tile in the explicit fallback: bounds its memory to rows x 4096
GRAD_TILE = 1024  # rows and keys per tile of the backward pass: its memory is O(GRAD_TILE^2) per head
DECODE_ROWS = 64  # calls with at most this many queries keep their grouped keys for the next call
KEYS_AHEAD = 64  # while decoding, grouped keys are rotated this many at a time (keys that exist already)


def block_rows(window: int) -> int:
    """Queries per block for window ``w``: about :data:`BLOCK_ROWS`, a multiple of ``w - 1`` (near keys
    are processed in sub-blocks shorter than ``w``)."""
    near = min(BLOCK_ROWS, max(1, window - 1))
    return near * max(1, BLOCK_ROWS // near)


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

    q ``[Hq, n, D]``, k/v ``[Hkv, m, D]`` (any float dtype, m >= 0), mask ``[n, m]`` bool (True =
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
    if k.shape[1] == 0:  # no keys at all (torch's CPU kernel would divide by zero): every row is empty
        return (torch.zeros(*q.shape[:2], v.shape[-1], dtype=q.dtype, device=q.device),
                torch.full(q.shape[:2], NEG_INF, device=q.device))
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
# one batch row of an attention call
# --------------------------------------------------------------------------------------------

GroupedKeysFn = Callable[[float, int, "int | None"], torch.Tensor]
"""``fn(G, last, available) -> [Hkv, last - first_key + 1, D]``: the row's keys ``first_key..last``
(key indices) rotated to their grouped positions for group size ``G``; with ``available`` (the index
of the newest key that exists) it may rotate keys up to there ahead of need."""


@dataclass(frozen=True)
class Row:
    """One batch row of one attention call, as the kernel sees it.

    q ``[Hq, Lq, D]`` at positions ``first_position + arange(Lq)``; k/v ``[Hkv, Lk, D]`` where key index
    ``j`` is at position ``j - key_offset`` (negative = left padding, never attended). The model rotated
    q and k at ``position + shift``. ``scale`` multiplies scores, ``softcap`` caps them (Gemma 2)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    first_position: int
    key_offset: int
    scale: float
    softcap: float | None = None
    shift: int = 0

    @property
    def first_key(self) -> int:
        """Index of the row's first real key (its position 0, or later when left padding is cut)."""
        return max(0, self.key_offset)

    @property
    def first_key_position(self) -> int:
        return self.first_key - self.key_offset

    @property
    def positions(self) -> torch.Tensor:
        """Positions of the queries ``[Lq]``."""
        return torch.arange(self.first_position, self.first_position + self.q.shape[1], device=self.q.device)


@dataclass(frozen=True)
class Keys:
    """Keys and values ``[Hkv, m, D]`` where the key at position ``p`` has index ``p + offset``."""

    k: torch.Tensor
    v: torch.Tensor
    offset: int

    def between(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at positions ``lo..hi`` (inclusive)."""
        return self.k[:, lo + self.offset : hi + self.offset + 1], self.v[:, lo + self.offset : hi + self.offset + 1]


def queries_to_grouped(q: torch.Tensor, first_position: int, shift: int, schedule: Schedule, group_size: float,
                       rotary: Rotary) -> torch.Tensor:
    """Queries ``q [H, n, D]`` at positions ``first_position ..`` (rotated at ``position + shift``)
    moved to their grouped positions ``p // G + w - w // G``."""
    pos = torch.arange(first_position, first_position + q.shape[1], device=q.device)
    target, _ = grouped_positions(pos, schedule.settings.window, group_size, schedule.settings.mode)
    return rotary.rotate_by(q, target - (pos + shift).to(torch.float64))


def _log_scaled(row: Row, pretrained_length: int) -> Row:
    """``row`` with each query multiplied by ``max(1, log(p + 1) / log(L))`` (the log-n temperature)."""
    factor = torch.clamp(torch.log(row.positions.double() + 1) / math.log(pretrained_length), min=1.0)
    q = (row.q.float() * factor.float()[None, :, None]).to(row.q.dtype)
    return Row(q, row.k, row.v, row.first_position, row.key_offset, row.scale, row.softcap, row.shift)


# --------------------------------------------------------------------------------------------
# blocks of rows and the pieces of keys they attend to
# --------------------------------------------------------------------------------------------


def _blocks(runs, first_position: int, start: int, lq: int, block_size: int):
    """Rows ``start..lq-1`` of a call whose first query is at ``first_position``, as ``(row_start,
    row_end, G)`` blocks of about ``block_size`` rows (at most 1.25x) inside the schedule's ``runs``."""
    blocks = []
    for run_start, run_end, g in runs:
        row, end_of_run = max(start, run_start - first_position), min(lq, run_end - first_position)
        while row < end_of_run:
            end = min(end_of_run, row + block_size)
            if end_of_run - end < block_size // 4:
                end = end_of_run  # no small last block: a few rows would cost as many kernel calls as a full one
            blocks.append((row, end, g))
            row = end
    return blocks


def pieces(row: Row, q: torch.Tensor, rows: Span, keys: Keys, span: Span, cuts, allowed: Span):
    """Attention of query rows ``q [Hq, n, D]`` at positions ``rows.lo..rows.hi`` over the keys of
    ``keys`` at positions ``span.lo..span.hi``, restricted to the distances ``allowed.lo <= p_i - p_j <=
    allowed.hi``, as pieces split after each position in ``cuts``. A piece runs

    * unmasked when every pair in it is allowed,
    * with the kernel's causal flag when it is a square whose allowed pairs form the lower
      triangle (``p_j - a <= p_i - p0``), or on the flipped square when they form the upper one,
    * with an explicit ``[rows, keys]`` mask otherwise (only at sequence starts or tiny windows).

    Returns a list of ``(out [Hq, n, D], lse [Hq, n])``, one per piece that has an allowed pair."""
    lo, hi = span
    dmin, dmax = allowed
    p0, p1 = rows
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
        ks, vs = keys.between(a, b)
        if how == "all":
            parts.append(attend(q, ks, vs, row.scale, None, row.softcap))
        elif how == "lower":
            parts.append(attend(q, ks, vs, row.scale, None, row.softcap, causal=True))
        elif how == "upper":
            out, lse = attend(q.flip(1), ks.flip(1), vs.flip(1), row.scale, None, row.softcap, causal=True)
            parts.append((out.flip(1), lse.flip(1)))
        else:
            d = torch.arange(p0, p1 + 1, device=q.device)[:, None] - torch.arange(a, b + 1, device=q.device)[None, :]
            parts.append(attend(q, ks, vs, row.scale, (d >= dmin) & (d <= dmax), row.softcap))
    return parts


def write_merged(out: torch.Tensor, rows: slice, parts) -> None:
    """Merge ``parts`` (all over the same rows) into ``out[:, rows]`` (float32 directly, else cast)."""
    target = out[:, rows]
    if out.dtype == torch.float32 and len(parts) > 1:
        merge(parts, out=target)
    else:
        target.copy_(merge(parts)[0])


def near_blocks(row: Row, s: int, e: int, window: int, far, out: torch.Tensor) -> None:
    """Rows ``s..e-1`` of ``row`` over their near keys, distances ``0..window-1``, in sub-blocks of
    fewer than ``window`` rows (so each band is an upper triangle, an unmasked middle and a lower
    triangle); each sub-block is merged with its rows of the ``far`` parts (``[(out [Hq, e - s, D],
    lse [Hq, e - s])]``) into ``out [Hq, Lq, D]``."""
    keys = Keys(row.k, row.v, row.key_offset)
    blocks = math.ceil((e - s) / max(1, window - 1))
    step = math.ceil((e - s) / blocks)  # even sub-blocks, each of at most window - 1 rows
    for a in range(s, e, step):
        b = min(e, a + step)
        pa, pb = row.first_position + a, row.first_position + b - 1
        near = pieces(row, row.q[:, a:b], Span(pa, pb), keys, Span(max(row.first_key_position, pa - window + 1), pb),
                       [pb - window + 1, pa - 1], Span(0, window - 1))
        rows_of_far = [(o[:, a - s : b - s], lse[:, a - s : b - s]) for o, lse in far]
        write_merged(out, slice(a, b), rows_of_far + near)


def _merge_two(a, b) -> torch.Tensor:
    """Merge two partial attentions over disjoint key sets, both seen by every row: ``out_b + w
    (out_a - out_b)`` with ``w = sigmoid(lse_a - lse_b)``, the share of the first. Float32."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    share = torch.sigmoid(lse_a - lse_b).unsqueeze(-1)  # [H, n, 1]
    return torch.lerp(out_b.float(), out_a.float(), share)


# --------------------------------------------------------------------------------------------
# the entry points: one batch row
# --------------------------------------------------------------------------------------------


def is_decode_step(row: Row, schedule: Schedule) -> bool:
    """Whether ``row`` is one query with grouped and neighbor keys both present (the common decode
    step: :func:`_decode_step`'s two kernel calls and one merge serve it)."""
    p = row.first_position
    return (row.q.shape[1] == 1 and not schedule.settings.log_scale and p >= 0
            and p - schedule.settings.window >= row.first_key_position and not schedule.is_plain(p))


def _decode_step(row: Row, schedule: Schedule, rotary: Rotary, grouped_keys: GroupedKeysFn) -> torch.Tensor:
    """The one query of a decode step (:func:`is_decode_step`): ``[Hq, 1, D]`` float32."""
    w, p = schedule.settings.window, row.first_position
    g = schedule.group_at(p)
    last_grouped = p - w + row.key_offset  # index of the last key at distance >= w
    kg = grouped_keys(g, last_grouped, p + row.key_offset)
    qg = queries_to_grouped(row.q, p, row.shift, schedule, g, rotary)
    far = attend(qg, kg, row.v[:, row.first_key : last_grouped + 1], row.scale, None, row.softcap)
    near_k, near_v = row.k[:, last_grouped + 1 : p + row.key_offset + 1], row.v[:, last_grouped + 1 : p + row.key_offset + 1]
    return _merge_two(far, attend(row.q, near_k, near_v, row.scale, None, row.softcap))


def selfextend_row(row: Row, schedule: Schedule, rotary: Rotary, grouped_keys: GroupedKeysFn,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """SelfExtend attention for one batch row: ``[Hq, Lq, D]`` written into ``out`` (any float dtype;
    made in q's dtype if None), zeros for left-padding rows, and returned.

    The queries go in blocks that share one G (``schedule.runs``); each block attends to its far keys
    at grouped positions (``grouped_keys``, query moved to ``p // G + w - w // G``) and to its near
    keys at ordinary positions, merged by log-sum-exp."""
    settings = schedule.settings
    lq = row.q.shape[1]
    if out is None:
        out = torch.empty(row.q.shape[0], lq, row.v.shape[-1], dtype=row.q.dtype, device=row.q.device)
    if is_decode_step(row, schedule):
        return out.copy_(_decode_step(row, schedule, rotary, grouped_keys))
    if settings.log_scale:
        row = _log_scaled(row, settings.pretrained_length)
    start = max(0, -row.first_position)  # rows before this are left padding: they stay zero
    out[:, :start] = 0
    w, first_pos = settings.window, row.first_key_position
    runs = schedule.runs(row.first_position + start, row.first_position + lq - 1) if start < lq else []
    for s, e, g in _blocks(runs, row.first_position, start, lq, settings.block_size or block_rows(w)):
        p0, p1 = row.first_position + s, row.first_position + e - 1
        if g == 1:  # ordinary causal attention: keys [first_pos, p1], any distance >= 0
            parts = pieces(row, row.q[:, s:e], Span(p0, p1), Keys(row.k, row.v, row.key_offset), Span(first_pos, p1),
                            [p0 - 1], ANY_DISTANCE)
            write_merged(out, slice(s, e), parts)
            continue
        far = []  # keys [first_pos, p1 - w] at grouped positions (distance >= w)
        if p1 - w >= first_pos:
            last = p1 - w + row.key_offset
            grouped = Keys(grouped_keys(g, last, None), row.v[:, row.first_key : last + 1], -first_pos)
            qg = queries_to_grouped(row.q[:, s:e], p0, row.shift, schedule, g, rotary)
            far = pieces(row, qg, Span(p0, p1), grouped, Span(first_pos, p1 - w), [p0 - w - 1], Span(w, math.inf))
        near_blocks(row, s, e, w, far, out)
    return out


def sliding_window_row(row: Row, window: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention restricted to distances ``< window`` (a sliding-window layer), in blocks:
    memory O(block x (window + block)) instead of the ``[Lq, Lk]`` mask the original path builds.
    Ordinary positions only (nothing is grouped); output as for :func:`selfextend_row`."""
    lq = row.q.shape[1]
    if out is None:
        out = torch.empty(row.q.shape[0], lq, row.v.shape[-1], dtype=row.q.dtype, device=row.q.device)
    start = max(0, -row.first_position)
    out[:, :start] = 0
    near_blocks(row, start, lq, window, [], out)
    return out
