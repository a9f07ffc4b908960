"""Rotary embeddings as the model itself applies them, and rotation by a position delta.

RoPE is a rotation, so ``R(a + d) x = R(d) R(a) x``: a query or key that the model already rotated
at its ordinary position ``p`` moves to a grouped position ``g`` by one more rotation by
``d = g - p``. Only the rotary dims move (partial rotary: the first ``rotary_dim`` dims). The
``attention_scaling`` of YaRN-like rope types is already inside q and k, so the delta rotation is a
pure rotation.

A :class:`Rotary` says how one layer rotates: its inverse frequencies and how dims are paired,

    rotate-half   (i, i + rotary_dim / 2)   Llama, Mistral, Qwen, Gemma, Phi, GPT-NeoX, ...
    interleaved   (2i, 2i + 1)              Cohere, GLM

:func:`layer_rotary` finds both from the model's own rotary module (``original_inv_freq``, computed
by transformers' rope init functions from ``rope_parameters``; per layer type for Gemma-3-like
models) and then *checks* them: it rotates a probe vector with the model's own
``apply_rotary_pos_emb`` and refuses the model unless one of the two layouts reproduces it. Rope
types whose frequencies change with the input length (``dynamic``, ``longrope``) are refused by
name: the keys in the cache would disagree with the frequencies of a later call, and SelfExtend is
itself the length extension.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import torch
from torch import nn

# rope types whose frequencies are fixed when the model is built (SelfExtend re-rotates with them)
FIXED_ROPE_TYPES = ("default", "linear", "yarn", "llama3", "proportional")
# rope types that recompute their frequencies from the input length in every forward call
LENGTH_DEPENDENT_ROPE_TYPES = ("dynamic", "longrope")
_PROBE_POSITIONS = (0, 1, 2, 3, 17)  # position 0 first: the model's attention scaling alone


class RotaryError(ValueError):
    """The model's rotary embedding is not one SelfExtend can re-rotate exactly (the message says why)."""


@dataclass(frozen=True)
class Rotary:
    """How one attention layer rotates queries and keys.

    ``inv_freq [rotary_dim // 2]`` (float64, on the layer's device) are the frequencies; pair ``i``
    is dims ``(i, i + rotary_dim // 2)`` (rotate-half) or ``(2i, 2i + 1)`` (``interleaved``)."""

    inv_freq: torch.Tensor
    interleaved: bool = False

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    def to(self, device) -> Rotary:
        return Rotary(self.inv_freq.to(device, torch.float64), self.interleaved)

    def cos_sin(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[..., rotary_dim // 2]`` (float32) of rotations by ``delta [...]`` positions.
        Angles are formed in float64, so large positions (32k and beyond) lose no precision."""
        angles = delta.to(torch.float64)[..., None] * self.inv_freq.to(delta.device)  # [..., rd/2]
        return angles.cos().to(torch.float32), angles.sin().to(torch.float32)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x [..., n, D]`` with pair ``i`` of row ``t`` rotated by ``cos/sin [n, rotary_dim // 2]``
        (broadcast against x's leading dims), computed in float32, returned in x's dtype; the dims
        past ``rotary_dim`` (partial rotary) pass through unchanged."""
        rd = self.rotary_dim
        xf = x.float()
        if self.interleaved:
            x1, x2 = xf[..., 0:rd:2], xf[..., 1:rd:2]
        else:
            x1, x2 = xf[..., : rd // 2], xf[..., rd // 2 : rd]
        if torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad):
            # autograd: out-of-place ops (the fused path below writes into slices with out=)
            r1 = torch.addcmul(x1 * cos, x2, sin, value=-1)  # the same operations as below, so the same bits
            r2 = torch.addcmul(x2 * cos, x1, sin)
            if self.interleaved:
                rotated = torch.stack((r1, r2), dim=-1).flatten(-2)
            else:
                rotated = torch.cat((r1, r2), dim=-1)
            return torch.cat((rotated, xf[..., rd:]), dim=-1).to(x.dtype)
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        o1, o2 = (out[..., 0:rd:2], out[..., 1:rd:2]) if self.interleaved else (out[..., : rd // 2], out[..., rd // 2 : rd])
        torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)  # x1 cos - x2 sin
        torch.mul(x2, cos, out=o2).addcmul_(x1, sin)  # x2 cos + x1 sin
        if rd < x.shape[-1]:
            out[..., rd:] = xf[..., rd:]
        return out.to(x.dtype)

    def rotate_by(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``x [..., n, D]`` rotated by ``delta [n]`` positions (or one scalar delta), x's dtype."""
        delta = torch.as_tensor(delta, dtype=torch.float64, device=x.device).reshape(-1)
        cos, sin = self.cos_sin(delta)
        return self.rotate(x, cos, sin)


# ------------------------------------------------------------------------------------------------
# the model's own frequencies and layout
# ------------------------------------------------------------------------------------------------


def find_rotary_modules(model: nn.Module) -> list[nn.Module]:
    """Modules of ``model`` that compute rotary embeddings (class name contains 'Rotary')."""
    return [m for m in model.modules() if "rotary" in type(m).__name__.lower()]


def _rope_parameters_for(config, layer_type: str | None) -> dict | None:
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict):
        return None
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        return params[layer_type]
    return params if "rope_type" in params or "rope_theta" in params else None


def rope_type_of(config, layer_type: str | None) -> str:
    """The rope type a layer of this (text) config uses ("default" when none is set)."""
    params = _rope_parameters_for(config, layer_type) or {}
    return str(params.get("rope_type", params.get("type", "default")))


def check_rope_type(config, layer_type: str | None) -> None:
    """Raise :class:`RotaryError` naming the rope type unless its frequencies are fixed."""
    rope_type = rope_type_of(config, layer_type)
    if rope_type in FIXED_ROPE_TYPES:
        return
    if rope_type in LENGTH_DEPENDENT_ROPE_TYPES:
        raise RotaryError(
            f"rope type {rope_type!r} recomputes its frequencies from the input length, so keys cached earlier and "
            "SelfExtend's grouped positions would use different ones; SelfExtend is itself the length extension: "
            "load the model with rope_parameters={'rope_type': 'default', ...} (same rope_theta)")
    raise RotaryError(f"rope type {rope_type!r} is not one SelfExtend knows (supported: {', '.join(FIXED_ROPE_TYPES)})")


def inv_freq_for_layer(model: nn.Module, config, layer_type: str | None) -> torch.Tensor | None:
    """Inverse frequencies ``[rotary_dim // 2]`` (float32, CPU) used by the given layer type, from the
    model's rotary module (buffers ``[<layer_type>_]original_inv_freq`` / ``inv_freq``), else computed
    with transformers' own init functions from the config. None when the model has neither."""
    names = []
    if layer_type is not None:
        names += [f"{layer_type}_original_inv_freq", f"{layer_type}_inv_freq"]
    names += ["original_inv_freq", "inv_freq"]
    for module in find_rotary_modules(model):
        for name in names:
            buf = getattr(module, name, None)
            if isinstance(buf, torch.Tensor) and buf.device.type != "meta":
                return buf.detach().to("cpu", torch.float32).clone()
    params = _rope_parameters_for(config, layer_type)
    if params is None:
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fn = ROPE_INIT_FUNCTIONS.get(params.get("rope_type", "default"))
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


def layer_rotary(model: nn.Module, attention: nn.Module, config, layer_type: str | None) -> Rotary:
    """The :class:`Rotary` of one attention module, checked against the model's own rotation.

    Raises :class:`RotaryError` (message says why) when the layer has no rotary embedding, uses a
    length-dependent rope type, or rotates in a way neither layout reproduces."""
    check_rope_type(config, layer_type)
    inv_freq = inv_freq_for_layer(model, config, layer_type)
    if inv_freq is None:
        if find_rotary_modules(model):
            raise RotaryError("its rotary embedding has no inverse frequencies SelfExtend can read "
                              "(a fixed table of sines applied to interleaved pairs, as in GPT-J)")
        raise RotaryError("it has no rotary position embedding")
    return Rotary(inv_freq.to(torch.float64), _probe_layout(model, attention, layer_type, inv_freq))


def _probe_layout(model, attention, layer_type, inv_freq) -> bool:
    """Rotate a probe with the model's rotary module and ``apply_rotary_pos_emb``; return whether
    the interleaved layout (else rotate-half) reproduces it, or raise :class:`RotaryError`."""
    apply = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
    rotary = find_rotary_modules(model)
    head_dim = next((d for d in (getattr(attention, "head_dim", None), getattr(attention, "head_size", None),
                                 getattr(attention.config, "head_dim", None)) if isinstance(d, int)), None)
    if apply is None or not rotary or head_dim is None:
        raise RotaryError("its attention does not rotate with a transformers rotary module and apply_rotary_pos_emb, "
                          "so SelfExtend cannot check how it rotates")
    module = rotary[0]
    positions = torch.tensor([_PROBE_POSITIONS])  # [1, n]
    buffer = next(module.buffers(), None)
    device = buffer.device if buffer is not None else torch.device("cpu")
    rd = 2 * inv_freq.numel()
    try:
        with torch.no_grad():
            kwargs = {"layer_type": layer_type} if "layer_type" in inspect.signature(module.forward).parameters else {}
            x = torch.zeros(1, positions.shape[1], head_dim, device=device)
            cos, sin = module(x, positions.to(device), **kwargs)  # [1, n, width]
            # the rotated part only (Phi splits it off before applying): the model passes the rest through
            probe = torch.randn(1, 1, positions.shape[1], cos.shape[-1], generator=torch.Generator().manual_seed(0))
            theirs = apply(probe.to(device), probe.to(device), cos, sin)[0].float().cpu()[0, 0]  # [n, width]
    except Exception as err:  # an apply_rotary_pos_emb with another calling convention
        raise RotaryError(f"its rotary embedding cannot be checked ({type(err).__name__}: {err})") from err
    probe = probe[0, 0]  # [n, width]
    if probe.shape[-1] < rd:
        raise RotaryError(f"its rotary embedding rotates {probe.shape[-1]} dims but has {rd // 2} frequencies")
    scale = float((theirs[0, :rd] @ probe[0, :rd]) / (probe[0, :rd] @ probe[0, :rd]))  # attention scaling
    for interleaved in (False, True):
        ours = Rotary(inv_freq.double(), interleaved).rotate_by(probe, torch.tensor(_PROBE_POSITIONS))
        ours = torch.cat((ours[:, :rd] * scale, ours[:, rd:]), dim=-1)
        if torch.allclose(ours, theirs, rtol=1e-3, atol=1e-4 * max(1.0, abs(scale))):
            return interleaved
    raise RotaryError("its rotary embedding is neither a rotate-half nor an interleaved rotation of its "
                      "inverse frequencies, so SelfExtend cannot move keys to grouped positions")


# ------------------------------------------------------------------------------------------------
# rotate-half tables over the whole rotary dim, as the vLLM path reads them
# ------------------------------------------------------------------------------------------------


def rotation(delta: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[..., rotary_dim]`` (float32, both halves equal: the rotate-half layout) of a rotation
    by ``delta`` positions."""
    cos, sin = Rotary(inv_freq.to(torch.float64)).cos_sin(delta)
    return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` dims of ``x [..., L, D]`` (rotate-half layout) by ``cos/sin
    [L, rotary_dim]`` as made by :func:`rotation`; x's dtype out."""
    half = cos.shape[-1] // 2
    rotary = Rotary(torch.zeros(half, dtype=torch.float64))  # only its rotary_dim and layout are used
    return rotary.rotate(x, cos[..., :half], sin[..., :half])
