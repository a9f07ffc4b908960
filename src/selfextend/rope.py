"""Rotary embeddings as the model itself defines them, and rotation by a position delta.

RoPE is a rotation, so ``R(a + d) x = R(d) R(a) x``: a query or key that the model already rotated
at its ordinary position ``p`` moves to a grouped position ``g`` by one more rotation by
``d = g - p``. Only the rotary dims move (partial rotary: the first ``rotary_dim`` dims, GPT-NeoX
and HF ``rotate_half`` layout). The ``attention_scaling`` of YaRN-like rope types is already
inside q and k, so the delta rotation is a pure rotation.

The inverse frequencies come from the model's own rotary-embedding module (``original_inv_freq``,
computed by transformers' rope init functions from ``rope_parameters``; per layer type for
Gemma-3-like models), falling back to ``ROPE_INIT_FUNCTIONS`` on the config.
"""

from __future__ import annotations

import torch
from torch import nn


def _rope_parameters_for(config, layer_type: str | None) -> dict | None:
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict):
        return None
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        return params[layer_type]
    return params if "rope_type" in params or "rope_theta" in params else None


def find_rotary_modules(model: nn.Module) -> list[nn.Module]:
    """Modules of ``model`` that compute rotary embeddings (class name contains 'Rotary')."""
    return [m for m in model.modules() if "rotary" in type(m).__name__.lower()]


def inv_freq_for_layer(model: nn.Module, config, layer_type: str | None) -> torch.Tensor | None:
    """Inverse frequencies ``[rotary_dim // 2]`` (float32, CPU) used by the given layer type.

    Returns None when the model has no rotary embedding."""
    names = []
    if layer_type is not None:
        names += [f"{layer_type}_original_inv_freq", f"{layer_type}_inv_freq"]
    names += ["original_inv_freq", "inv_freq"]
    for module in find_rotary_modules(model):
        for name in names:
            buf = getattr(module, name, None)
            if isinstance(buf, torch.Tensor) and buf.device.type != "meta":
                return buf.detach().to("cpu", torch.float32).clone()
    # No usable buffer: compute with transformers' own init functions from the config.
    params = _rope_parameters_for(config, layer_type)
    if params is None:
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = params.get("rope_type", "default")
    fn = ROPE_INIT_FUNCTIONS.get(rope_type)
    if fn is None:
        for module in find_rotary_modules(model):
            fn = getattr(module, "compute_default_rope_parameters", None)
            if fn is not None:
                break
    if fn is None:
        return None
    kwargs = {"layer_type": layer_type} if layer_type is not None else {}
    inv_freq, _ = fn(config, "cpu", **kwargs)
    return inv_freq.to(torch.float32)


def rotation(delta: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[..., rotary_dim]`` (float32) of a rotation by ``delta`` positions.

    Angles are formed in float64, so large positions (32k and beyond) lose no precision."""
    angles = delta.to(torch.float64)[..., None] * inv_freq.to(delta.device, torch.float64)  # [..., rd/2]
    angles = torch.cat((angles, angles), dim=-1)  # [..., rd]  (HF rotate_half layout)
    return angles.cos().to(torch.float32), angles.sin().to(torch.float32)


def rotate_by(x: torch.Tensor, delta: float, inv_freq64: torch.Tensor) -> torch.Tensor:
    """``x [..., D]`` rotated by one position ``delta`` (the decode step's fast path: a handful of
    small ops, no position tensors). ``inv_freq64 [rotary_dim // 2]`` float64 on x's device.
    Computed in float32 by :func:`rotate`, returned in x's dtype."""
    angles = (inv_freq64 * delta).repeat(2)  # [rotary_dim] float64, both halves equal as rotate() expects
    return rotate(x.float(), angles.cos().float(), angles.sin().float()).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` dims of ``x [..., L, D]`` by ``cos/sin [L, rotary_dim]`` (as made
    by :func:`rotation`: HF ``rotate_half`` layout, both halves equal).

    The remaining ``D - rotary_dim`` dims (partial rotary) pass through unchanged. Four fused
    multiply-adds on halves, no concatenation (this runs on every query block and new key)."""
    rd = cos.shape[-1]
    half = rd // 2
    c, s = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., :half], x[..., half:rd]
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)
    torch.mul(x1, c, out=out[..., :half]).addcmul_(x2, s, value=-1)  # x1 cos - x2 sin
    torch.mul(x2, c, out=out[..., half:rd]).addcmul_(x1, s)  # x2 cos + x1 sin
    if rd < x.shape[-1]:
        out[..., rd:] = x[..., rd:]
    return out
