"""Switch a peer method (STRING or DCA) on and off on a stock transformers model, through the same
public hooks SelfExtend uses (``selfextend.integration``): an attention function and a mask function
registered with transformers under the method's name, selected with ``set_attn_implementation``.

The mask function returns a small :class:`PeerMask` (the mask arguments), never an ``L x L`` tensor; the
attention function computes each row in blocks (``peers.kernel``). Sliding-window layers (Gemma 2/3)
keep their ordinary positions and window, computed in blocks too. Sequences must be unpadded (a batch of
one, or of equal lengths): what ``selfextend eval`` runs.

State: the settings live on the model (``model._selfextend_peer``); the length a DCA sequence's scale
was chosen for, and DCA's keys moved to ``j mod c``, live on the KV cache object, so a copy of the cache
(``copy.deepcopy``) continues as the original would.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..rope import inv_freq_for_layer
from .formulas import DcaSettings, StringSettings
from .kernel import dca_keys, dca_row, sliding_row, string_row

PEER_NAMES = ("string", "dca")
_LENGTH_ATTR = "_selfextend_peer_length"  # on a cache: the length the sequence's DCA scale was chosen for
_PLANNED_ATTR = "_selfextend_peer_planned"  # on a cache: the announced length of the next sequence
_KEYS_ATTR = "_selfextend_peer_dca_keys"  # on a cache: {(layer, row): (count, last key, moved keys)}


@dataclass
class PeerSetup:
    name: str
    settings: StringSettings | DcaSettings
    original_impl: str


class PeerMask:
    """The mask factory's arguments, kept instead of the ``[B, 1, Lq, Lk]`` tensor it would build."""

    ndim = 4

    def __init__(self, kwargs: dict):
        padding = kwargs.get("attention_mask")
        self.padding = padding.padding if isinstance(padding, PeerMask) else padding
        q_offset = kwargs.get("q_offset") or 0
        self.q_offset = int(q_offset)
        self.local_size = kwargs.get("local_size")
        self.shape = (kwargs.get("batch_size"), 1, kwargs.get("q_length"), kwargs.get("kv_length"))


def _peer_mask(**kwargs) -> PeerMask:
    return PeerMask(kwargs)


_CALL = threading.local()


def _hand_over_cache(module, args, kwargs):
    cache = kwargs.get("cache", kwargs.get("past_key_values", kwargs.get("layer_past")))
    _CALL.module, _CALL.cache = module, (weakref.ref(cache) if cache is not None else None)


def _call_cache(module):
    if getattr(_CALL, "module", None) is not module or _CALL.cache is None:
        return None
    return _CALL.cache()


def plan_length(cache, length: int | None) -> None:
    """Announce that the next sequence written into ``cache`` from position 0 will have ``length`` tokens
    although its first forward call holds fewer (a prompt prefilled in parts): DCA chooses its scale
    for the whole sequence, as one pass over it would. None forgets the announcement."""
    setattr(cache, _PLANNED_ATTR, length)


def _sequence_length(module, first: int, total: int) -> int:
    """The length DCA's scale is chosen for: fixed by the call that holds the sequence from position 0."""
    cache = _call_cache(module)
    if cache is None:
        return total
    if first == 0:
        length = max(total, getattr(cache, _PLANNED_ATTR, None) or 0)
        setattr(cache, _LENGTH_ATTR, length)
        return length
    return getattr(cache, _LENGTH_ATTR, None) or total


def _moved_keys(module, settings, inv_freq, k, row: int):
    """``count -> keys [Hkv, count, D]`` at ``j mod c``, kept on the KV cache between calls (checked
    against the cache's key at the last index kept: a key that deep depends on every earlier token)."""
    cache = _call_cache(module)
    store = None
    if cache is not None:
        store = getattr(cache, _KEYS_ATTR, None)
        if store is None:
            store = {}
            setattr(cache, _KEYS_ATTR, store)

    def get(count: int) -> torch.Tensor:
        kept = store.get((module.layer_idx, row)) if store is not None else None
        if kept is not None and kept[0] >= count and torch.equal(k[:, kept[0] - 1], kept[1]):
            return kept[2][:, :count]
        moved = dca_keys(k, count, settings, inv_freq)
        if store is not None:
            store[(module.layer_idx, row)] = (count, k[:, count - 1].clone(), moved)
        return moved

    return get


def peer_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function for the peers. query ``[B, Hq, Lq, D]``, key/value
    ``[B, Hkv, Lk, D]`` (rotated at ordinary positions, cache included). Returns ``([B, Lq, Hq, D], None)``."""
    layer = getattr(module, "_selfextend_peer", None)
    if layer is None:
        raise RuntimeError(f"{type(module).__name__} runs a peer attention implementation but was not set up by "
                           "selfextend.peers.enable_peer(model, ...)")
    setup, inv_freq = layer
    if dropout and module.training:
        raise NotImplementedError("STRING and DCA run for inference only: call model.eval()")
    mask = attention_mask if isinstance(attention_mask, PeerMask) else None
    if attention_mask is not None and mask is None:
        raise NotImplementedError(f"{setup.name} received a ready-made 4D attention mask; pass none (unpadded input)")
    if mask is not None and mask.padding is not None and not bool(mask.padding.all()):
        raise NotImplementedError(f"{setup.name} runs unpadded sequences only (a batch of one, or of equal lengths); "
                                  "this batch has padding")
    batch, _, lq, _ = query.shape
    first = mask.q_offset if mask is not None else key.shape[2] - lq
    total = first + lq
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and int(position_ids.reshape(-1)[0]) != first:
        raise NotImplementedError(f"{setup.name} needs position_ids that count from 0 with the cache (no shift)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    softcap = kwargs.get("softcap")
    window = mask.local_size if mask is not None and mask.local_size else kwargs.get("sliding_window")
    out = torch.empty(batch, lq, query.shape[1], value.shape[-1], dtype=query.dtype, device=query.device)
    settings = setup.settings
    for b in range(batch):
        q, k, v = query[b], key[b, :, :total], value[b, :, :total]
        target = out[b].transpose(0, 1)  # [Hq, Lq, D] view
        if window:
            sliding_row(q, k, v, first, window, scale, softcap, settings.block_size, out=target)
        elif isinstance(settings, StringSettings):
            string_row(q, k, v, first, settings, inv_freq, scale, softcap, out=target)
        else:
            dca_row(q, k, v, first, settings, inv_freq, scale, _sequence_length(module, first, total), softcap,
                    out=target, chunk_keys=_moved_keys(module, settings, inv_freq, k, b))
    return out, None


for _name in PEER_NAMES:
    AttentionInterface.register(_name, peer_attention)
    AttentionMaskInterface.register(_name, _peer_mask)


def _attention_modules(model):
    return [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "config")
            and "attention" in type(m).__name__.lower()]


def peer_settings(name: str, pretrained_length: int, **params) -> StringSettings | DcaSettings:
    """The settings of peer ``name`` ("string" or "dca") for a model trained on ``pretrained_length``;
    ``params``: ``shift``/``local`` (STRING), ``chunk_size``/``local`` (DCA), ``block_size``."""
    if name == "string":
        return StringSettings.for_length(pretrained_length, **params)
    if name == "dca":
        return DcaSettings.for_length(pretrained_length, **params)
    raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEER_NAMES)}")


def enable_peer(model, name: str, pretrained_length: int | None = None, **params):
    """Switch peer ``name`` on for ``model`` (its settings from :func:`peer_settings`; ``pretrained_length``
    default ``max_position_embeddings``). Returns the settings. Undo with :func:`disable_peer`."""
    config = model.config.get_text_config()
    settings = peer_settings(name, pretrained_length or config.max_position_embeddings, **params)
    if getattr(model, "_selfextend", None) is not None or getattr(model, "_selfextend_peer", None) is not None:
        raise ValueError("another method is enabled on this model; disable it first")
    layer_types = getattr(config, "layer_types", None)
    modules = _attention_modules(model)
    freqs = {}
    for m in modules:
        layer_type = layer_types[m.layer_idx] if layer_types and m.layer_idx < len(layer_types) else None
        inv_freq = inv_freq_for_layer(model, config, layer_type)
        if inv_freq is None:
            raise ValueError(f"{name} needs rotary position embeddings; this model has none")
        freqs[m] = inv_freq.to(torch.float64)
    setup = PeerSetup(name, settings, model.config._attn_implementation or "sdpa")
    model.set_attn_implementation(name)
    model._selfextend_peer = setup
    for m in modules:
        m._selfextend_peer = (setup, freqs[m])
        m.register_forward_pre_hook(_hand_over_cache, with_kwargs=True)
    return settings


def disable_peer(model) -> None:
    """Switch the peer off: the model computes exactly as before :func:`enable_peer`."""
    setup = getattr(model, "_selfextend_peer", None)
    if setup is None:
        return
    for m in model.modules():
        if "_selfextend_peer" in m.__dict__ and m is not model:
            del m._selfextend_peer
        for hook_id, hook in list(m._forward_pre_hooks.items()):
            if hook is _hand_over_cache:
                del m._forward_pre_hooks[hook_id]
                m._forward_pre_hooks_with_kwargs.pop(hook_id, None)
    model.set_attn_implementation(setup.original_impl)
    del model._selfextend_peer


__all__ = ["PEER_NAMES", "enable_peer", "disable_peer", "peer_settings", "plan_length", "peer_attention"]
