"""SelfExtend written naively, as the paper states it: full score matrices, one softmax per row.

Queries and keys arrive rotated at their ordinary positions. ``naive_attention`` rotates both once
more, to the grouped positions (query ``p // G + w - w // G``, key ``p // G``), builds the neighbor
and the grouped score matrices, takes the neighbor score where ``p_i - p_j < w`` and the grouped one
elsewhere, masks the future and takes one softmax over the merged row: O(queries x keys) memory per
head. The position formulas are written out here: this module imports nothing of the package (not
``positions``, ``schedule`` or the fast path in ``attention.py``), so it can serve as their reference.

:func:`use_naive_attention` runs it as a model's attention implementation (registered under its own
name, ``"selfextend_naive"``), with G per query from a function the caller gives. Two users: the
tests' float64 reference (``reference_logits`` in ``tests/conftest.py``, G written out there) and
``selfextend bench``, which measures the official implementation's cost (``bench.naive_applied``, G
from the library's schedule).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

ATTENTION_NAME = "selfextend_naive"

# (query positions [Lq], position of the sequence's last key) -> G of each query [Lq] (float; inf = rerope)
GroupSizes = Callable[[torch.Tensor, int], torch.Tensor]
# attention module -> (inverse frequencies [rotary_dim // 2], whether pairs are interleaved (2i, 2i + 1))
LayerRotary = Callable[[torch.nn.Module], tuple[torch.Tensor, bool]]


def rotate_by(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
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
                    key_valid=None, log_scale_length=None, dtype=torch.float64, interleaved=False, allowed=None):
    """q [Hq, Lq, D] at positions q_pos [Lq]; k, v [Hkv, Lk, D] at k_pos [Lk]; group_sizes [Lq] (per
    query, float; 1 = nothing grouped); key_valid [Lk] bool (False = padding); allowed [Lq, Lk] bool
    (the keys each query may see, e.g. a padding or sliding-window mask); ``interleaved``: the model
    rotates pairs (2i, 2i + 1). Returns [Hq, Lq, D] in ``dtype`` (rotations are computed in float64,
    the matrix products in ``dtype``); a query that may see no key gets zeros."""
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
        qg = rotate_by(q.double(), qg_pos - q_pos.double(), inv_freq, interleaved).to(dtype)
        kg = rotate_by(k.double(), kg_pos - k_pos.double(), inv_freq, interleaved).to(dtype)
        sg = torch.matmul(qg, kg.transpose(-1, -2)) * scale  # [Hq, Lq, Lk] grouped scores
        use = rows[:, None] & (d >= window)
        scores = torch.where(use[None], sg, scores)
        del qg, kg, sg, use
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    seen = d >= 0  # [Lq, Lk]
    if key_valid is not None:
        seen = seen & key_valid[None, :]
    if allowed is not None:
        seen = seen & allowed
    sees_any = seen.any(-1, keepdim=True)  # [Lq, 1]
    scores = scores.masked_fill(~(seen | ~sees_any)[None], float("-inf"))  # a query that sees nothing: no -inf row
    return torch.matmul(torch.softmax(scores, dim=-1), v).masked_fill(~sees_any[None], 0.0)


# ------------------------------------------------------------------------------------------------
# as a transformers attention implementation
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layer:
    window: int
    mode: str
    group_sizes: GroupSizes
    inv_freq: torch.Tensor  # [rotary_dim // 2]
    interleaved: bool
    dtype: torch.dtype | None  # of the computation; None = the model's


_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # attention module -> _Layer


def _positions(position_ids, row: int, lq: int, lk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query positions [Lq], key positions [Lk]) of batch row ``row``. A call that holds every key (no
    KV cache) has key j at ``position_ids[row, j]``; with a cache, key j is at position j and the
    queries are the last Lq (rows without padding)."""
    if position_ids is not None and lq == lk:
        pos = position_ids[min(row, position_ids.shape[0] - 1)]
        return pos, pos
    k_pos = torch.arange(lk)
    return k_pos[lk - lq:], k_pos


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [B, Hq, Lq, D], key/value [B, Hkv, Lk, D], attention_mask
    None (causal) or [B, 1, Lq, Lk] bool. Returns [B, Lq, Hq, D]. Sliding-window layers keep their
    ordinary positions (their window is in the mask)."""
    layer = _LAYERS[module]
    lq, lk = query.shape[2], key.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    local = kwargs.get("sliding_window") is not None
    out = torch.empty(*query.shape[:3], value.shape[-1], dtype=query.dtype, device=query.device)  # [B, Hq, Lq, D]
    for b in range(query.shape[0]):
        q_pos, k_pos = (p.to(query.device) for p in _positions(kwargs.get("position_ids"), b, lq, lk))
        if local:  # nothing grouped
            mode, groups = "floor", torch.ones(lq, dtype=torch.float64)
        else:
            mode, groups = layer.mode, layer.group_sizes(q_pos, int(k_pos.max()))
        allowed = None if attention_mask is None else attention_mask[b, 0]
        out[b] = naive_attention(query[b], key[b], value[b], q_pos, k_pos, layer.inv_freq.to(query.device), layer.window,
                                 groups.to(q_pos.device), mode, scale,
                                 softcap=kwargs.get("softcap"), dtype=layer.dtype or query.dtype,
                                 interleaved=layer.interleaved, allowed=allowed)
    return out.transpose(1, 2).contiguous(), None


@contextmanager
def use_naive_attention(model, window: int, mode: str, group_sizes: GroupSizes, rotary: LayerRotary,
                        dtype: torch.dtype | None = None) -> Iterator[None]:
    """Within the block, every attention layer of ``model`` runs :func:`naive_attention` with neighbor
    window ``window``, ``mode`` ("floor", "leaky", "rerope"), G per query from ``group_sizes``, each
    layer's rotation from ``rotary`` and the matrix products in ``dtype`` (default the model's). The
    mask is transformers' own (``sdpa_mask``: None for a causal call, padding and sliding windows as a
    boolean matrix)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    modules = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)
               and "attention" in type(m).__name__.lower()]
    for m in modules:
        inv_freq, interleaved = rotary(m)
        _LAYERS[m] = _Layer(window, mode, group_sizes, inv_freq, interleaved, dtype)
    AttentionInterface.register(ATTENTION_NAME, _attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    original = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(original)
        for m in modules:
            _LAYERS.pop(m, None)
