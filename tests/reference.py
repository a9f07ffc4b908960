"""A naive, independent SelfExtend reference (tests only): float64, full score matrices.

It follows the paper's formula literally: rotate q and k (already rotated at their ordinary
positions) to the grouped positions, build the neighbor and the grouped score matrices, take the
neighbor score where ``p_i - p_j < w`` and the grouped one elsewhere, one softmax over the merged row.
"""

from __future__ import annotations

import math

import torch


def _rotate_by(x, delta, inv_freq):
    """x [..., L, D] rotated by delta [L] (float64), HF rotate_half layout on the first 2*len(inv_freq) dims."""
    rd = 2 * inv_freq.numel()
    ang = delta.double()[..., :, None] * inv_freq.double()[None, :]  # [.., L, rd/2]
    cos = torch.cat((ang.cos(), ang.cos()), -1)
    sin = torch.cat((ang.sin(), ang.sin()), -1)
    xr, xp = x[..., :rd], x[..., rd:]
    x1, x2 = xr[..., : rd // 2], xr[..., rd // 2 :]
    rot = torch.cat((-x2, x1), -1)
    return torch.cat((xr * cos + rot * sin, xp), -1)


def grouped(p, window, group, mode):
    p = p.double()
    if mode == "rerope" or math.isinf(group):
        return torch.full_like(p, float(window)), torch.zeros_like(p)
    if mode == "floor":
        return torch.floor(p / group) + window - math.floor(window / group), torch.floor(p / group)
    return p / group + window - window / group, p / group


def reference_attention(q, k, v, q_pos, k_pos, inv_freq, window, group_sizes, mode, scale, softcap=None,
                        key_valid=None, log_scale_length=None, dtype=torch.float64):
    """q [Hq, Lq, D] at positions q_pos [Lq]; k, v [Hkv, Lk, D] at k_pos [Lk]; group_sizes [Lq]
    (per query, float; 1 = nothing grouped). key_valid [Lk] bool. Returns [Hq, Lq, D] in ``dtype``."""
    hq, hkv = q.shape[0], k.shape[0]
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    k = k.repeat_interleave(hq // hkv, 0)
    v = v.repeat_interleave(hq // hkv, 0)
    if log_scale_length is not None:
        f = torch.clamp(torch.log(q_pos.double() + 1) / math.log(log_scale_length), min=1.0)
        q = q * f.to(dtype)[None, :, None]
    d = q_pos[:, None] - k_pos[None, :]  # [Lq, Lk]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # neighbor scores
    for g in sorted(set(group_sizes.tolist())):
        if g == 1 and mode != "rerope":
            continue
        rows = group_sizes == g
        qg_pos, _ = grouped(q_pos, window, g, mode)
        _, kg_pos = grouped(k_pos, window, g, mode)
        qg = _rotate_by(q.double(), qg_pos - q_pos.double(), inv_freq).to(dtype)
        kg = _rotate_by(k.double(), kg_pos - k_pos.double(), inv_freq).to(dtype)
        sg = torch.matmul(qg, kg.transpose(-1, -2)) * scale
        use = rows[:, None] & (d >= window)
        scores = torch.where(use[None], sg, scores)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = d >= 0
    if key_valid is not None:
        allowed = allowed & key_valid[None, :]
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v)
