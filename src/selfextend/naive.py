"""SelfExtend written naively, as the paper states it: full score matrices, one softmax per row.

Queries and keys arrive rotated at their ordinary positions. ``naive_attention`` rotates both once
more, to the grouped positions (query ``p // G + w - w // G``, key ``p // G``), builds the neighbor
and the grouped score matrices, takes the neighbor score where ``p_i - p_j < w`` and the grouped one
elsewhere, masks the future and takes one softmax over the merged row: O(queries x keys) memory per
head. The position formulas are written out here, independently of ``positions.py`` and of the fast
path in ``attention.py``.

Two users: the float64 reference that the tests hold the fast path to, and ``selfextend bench``,
which measures the official implementation's cost with :func:`use_naive_attention` (the model runs
this merge as its attention, registered under its own name ``"selfextend_naive"``).
"""

from __future__ import annotations

import math
import weakref
from contextlib import contextmanager

import torch

from .schedule import Schedule
from .settings import Settings

ATTENTION_NAME = "selfextend_naive"


def _rotate_by(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """x [..., L, D] rotated by delta [L] positions (float64) on the first 2 * len(inv_freq) dims (the
    rest, partial rotary, passes through): pairs (i, i + rd/2) as HF's rotate_half, or (2i, 2i + 1)
    when ``interleaved`` (Cohere, GLM)."""
    rd = 2 * inv_freq.numel()
    ang = delta.double()[..., :, None] * inv_freq.double()[None, :]  # [L, rd/2]
    xr, xp = x[..., :rd], x[..., rd:]
    if interleaved:
        cos, sin = ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)  # [L, rd]
        rot = torch.stack((-xr[..., 1::2], xr[..., 0::2]), -1).flatten(-2)
    else:
        cos, sin = torch.cat((ang.cos(), ang.cos()), -1), torch.cat((ang.sin(), ang.sin()), -1)  # [L, rd]
        rot = torch.cat((-xr[..., rd // 2:], xr[..., : rd // 2]), -1)
    return torch.cat((xr * cos + rot * sin, xp), -1)


def grouped(p: torch.Tensor, window: int, group: float, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(grouped query positions, grouped key positions) of positions ``p``, float64."""
    p = p.double()
    if mode == "rerope" or math.isinf(group):
        return torch.full_like(p, float(window)), torch.zeros_like(p)
    if mode == "floor":
        return torch.floor(p / group) + window - math.floor(window / group), torch.floor(p / group)
    return p / group + window - window / group, p / group  # leaky: divided, not floored


def naive_attention(q, k, v, q_pos, k_pos, inv_freq, window, group_sizes, mode, scale, softcap=None,
                    key_valid=None, log_scale_length=None, dtype=torch.float64, interleaved=False):
    """q [Hq, Lq, D] at positions q_pos [Lq]; k, v [Hkv, Lk, D] at k_pos [Lk]; group_sizes [Lq] (per
    query, float; 1 = nothing grouped); key_valid [Lk] bool (False = padding); ``interleaved``: the
    model rotates pairs (2i, 2i + 1). Returns [Hq, Lq, D] in ``dtype`` (rotations are computed in
    float64, the matrix products in ``dtype``)."""
    hq, hkv = q.shape[0], k.shape[0]
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    k = k.repeat_interleave(hq // hkv, 0)  # [Hq, Lk, D]
    v = v.repeat_interleave(hq // hkv, 0)
    if log_scale_length is not None:
        f = torch.clamp(torch.log(q_pos.double() + 1) / math.log(log_scale_length), min=1.0)
        q = q * f.to(dtype)[None, :, None]
    d = q_pos[:, None] - k_pos[None, :]  # [Lq, Lk] distances
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [Hq, Lq, Lk] neighbor scores
    for g in sorted(set(group_sizes.tolist())):
        if g == 1 and mode != "rerope":
            continue
        rows = group_sizes == g  # [Lq] queries that use this G
        qg_pos, _ = grouped(q_pos, window, g, mode)
        _, kg_pos = grouped(k_pos, window, g, mode)
        qg = _rotate_by(q.double(), qg_pos - q_pos.double(), inv_freq, interleaved).to(dtype)
        kg = _rotate_by(k.double(), kg_pos - k_pos.double(), inv_freq, interleaved).to(dtype)
        sg = torch.matmul(qg, kg.transpose(-1, -2)) * scale  # [Hq, Lq, Lk] grouped scores
        use = rows[:, None] & (d >= window)
        scores = torch.where(use[None], sg, scores)
        del qg, kg, sg, use
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = d >= 0
    if key_valid is not None:
        allowed = allowed & key_valid[None, :]
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


# ------------------------------------------------------------------------------------------------
# as a transformers attention implementation (the benchmark's "naive" method)
# ------------------------------------------------------------------------------------------------
_MODULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # attention module -> (Settings, inv_freq)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [B, Hq, Lq, D], key/value [B, Hkv, Lk, D], one sequence
    per row without padding (key j at position j, the queries the last Lq). Returns [B, Lq, Hq, D]."""
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError("the naive merge covers full-attention layers only (no sliding window)")
    settings, inv_freq = _MODULES[module]
    lq, lk = query.shape[2], key.shape[2]
    schedule = Schedule.for_sequence(settings, lk)  # no KV state here: G from the keys the call sees (a prompt)
    k_pos = torch.arange(lk)
    q_pos = k_pos[lk - lq:]
    groups = torch.tensor([float(schedule.group_at(int(p))) for p in q_pos], dtype=torch.float64)  # [Lq]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = torch.stack([naive_attention(query[b], key[b], value[b], q_pos, k_pos, inv_freq, settings.window, groups,
                                       settings.mode, scale, softcap=kwargs.get("softcap"), dtype=query.dtype)
                       for b in range(query.shape[0])])  # [B, Hq, Lq, D]
    return out.transpose(1, 2).contiguous(), None


@contextmanager
def use_naive_attention(model, settings: Settings):
    """Within the block, every attention layer of ``model`` runs :func:`naive_attention` with
    ``settings`` (transformers builds no mask for it: the merge masks by position itself)."""
    from transformers import AttentionInterface

    from .rope import inv_freq_for_layer

    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None)
    modules = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)
               and "attention" in type(m).__name__.lower()]
    for m in modules:
        _MODULES[m] = (settings, inv_freq_for_layer(model, config, layer_types[m.layer_idx] if layer_types else None))
    AttentionInterface.register(ATTENTION_NAME, _attention)
    original = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(original)
        for m in modules:
            _MODULES.pop(m, None)
