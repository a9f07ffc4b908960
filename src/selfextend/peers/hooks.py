"""Switch a peer method (STRING or DCA) on and off on a stock transformers model, through the same
public hooks SelfExtend uses (``selfextend.integration``): an attention function and a mask function
registered with transformers under the method's name, selected with ``set_attn_implementation``.

The mask function is SelfExtend's (``call.selfextend_mask``: the mask arguments, never an ``L x L``
tensor, and the call's KV cache); the attention function computes each row in blocks on SelfExtend's
kernel pieces (``peers.kernel``). Sliding-window layers (Gemma 2/3)
keep their ordinary positions and window, computed in blocks too. Sequences must be unpadded (a batch of
one, or of equal lengths): what ``selfextend eval`` runs.

State: the settings live on the model (``model._selfextend_peer``); the length a DCA sequence's scale
was chosen for, and DCA's keys moved to ``j mod c``, live on the KV cache object, so a copy of the cache
(``copy.deepcopy``) continues as the original would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..attention import Row, sliding_window_row
from ..call import DeferredMask, hand_over_cache, remove_hand_over, selfextend_mask
from ..rope import RotaryError, layer_rotary
from ..sequence import announced_length
from .formulas import DcaSettings, StringSettings
from .kernel import dca_keys, dca_row, string_row

PEER_NAMES = ("string", "dca")
_LENGTH_ATTR = "_selfextend_peer_length"  # on a cache: the length the sequence's DCA scale was chosen for
_KEYS_ATTR = "_selfextend_peer_dca_keys"  # on a cache: {(layer, row): (count, last key, moved keys)}


@dataclass
class PeerSetup:
    name: str
    settings: StringSettings | DcaSettings
    original_impl: str


def _sequence_length(cache, first: int, total: int) -> int:
    """The length DCA's scale is chosen for: fixed by the call that holds the sequence from position 0
    (the length announced with ``selfextend.prompt_length`` if any, as for SelfExtend's G), kept on the
    KV cache for the calls after it."""
    if first == 0:
        length = announced_length(0, 1) or total
        if cache is not None:
            setattr(cache, _LENGTH_ATTR, length)
        return length
    return getattr(cache, _LENGTH_ATTR, None) or total


def _moved_keys(module, cache, settings, rotary, k, row: int):
    """``count -> keys [Hkv, count, D]`` at ``j mod c``, kept on the KV cache between calls (checked
    against the cache's key at the last index kept: a key that deep depends on every earlier token)."""
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
        moved = dca_keys(k, count, settings, rotary)
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
    setup, rotary = layer
    if dropout and module.training:
        raise NotImplementedError("STRING and DCA run for inference only: call model.eval()")
    mask = attention_mask if isinstance(attention_mask, DeferredMask) else None
    if attention_mask is not None and mask is None:
        raise NotImplementedError(f"{setup.name} received a ready-made 4D attention mask; pass none (unpadded input)")
    if mask is not None and mask.padding is not None and not bool(mask.padding.all()):
        raise NotImplementedError(f"{setup.name} runs unpadded sequences only (a batch of one, or of equal lengths); "
                                  "this batch has padding")
    batch, _, lq, _ = query.shape
    first = mask.q_offset if mask is not None else key.shape[2] - lq
    total = first + lq
    # key index j is at position kv_offset + j: a sliding-window layer's cache keeps only its last keys
    kv_offset = mask.kv_offset if mask is not None else 0
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and int(position_ids.reshape(-1)[0]) != first:
        raise NotImplementedError(f"{setup.name} needs position_ids that count from 0 with the cache (no shift)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window = mask.local_size if mask is not None and mask.local_size else kwargs.get("sliding_window")
    cache = mask.cache if mask is not None else None
    out = torch.empty(batch, lq, query.shape[1], value.shape[-1], dtype=query.dtype, device=query.device)
    settings = setup.settings
    for b in range(batch):
        row = Row(query[b], key[b, :, : total - kv_offset], value[b, :, : total - kv_offset], first, -kv_offset,
                  scale, kwargs.get("softcap"))
        target = out[b].transpose(0, 1)  # [Hq, Lq, D] view
        if window:
            sliding_window_row(row, window, out=target)
        elif isinstance(settings, StringSettings):
            string_row(row, settings, rotary, out=target)
        else:
            dca_row(row, settings, rotary, _sequence_length(cache, first, total), out=target,
                    chunk_keys=_moved_keys(module, cache, settings, rotary, row.k, b))
    return out, None


for _name in PEER_NAMES:
    AttentionInterface.register(_name, peer_attention)
    AttentionMaskInterface.register(_name, selfextend_mask)


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
    rotaries = {}
    for m in modules:
        layer_type = layer_types[m.layer_idx] if layer_types and m.layer_idx < len(layer_types) else None
        if layer_type not in rotaries:
            try:
                rotaries[layer_type] = layer_rotary(model, m, config, layer_type)
            except RotaryError as err:
                raise ValueError(f"{name} cannot run on this model: {err}") from None
    setup = PeerSetup(name, settings, model.config._attn_implementation or "sdpa")
    model.set_attn_implementation(name)
    model._selfextend_peer = setup
    for m in modules:
        layer_type = layer_types[m.layer_idx] if layer_types and m.layer_idx < len(layer_types) else None
        m._selfextend_peer = (setup, rotaries[layer_type].to(next(m.parameters()).device))
        m.register_forward_pre_hook(hand_over_cache, with_kwargs=True)
    return settings


def disable_peer(model) -> None:
    """Switch the peer off: the model computes exactly as before :func:`enable_peer`."""
    setup = getattr(model, "_selfextend_peer", None)
    if setup is None:
        return
    for m in model.modules():
        if "_selfextend_peer" in m.__dict__ and m is not model:
            del m._selfextend_peer
    remove_hand_over(model)
    model.set_attn_implementation(setup.original_impl)
    del model._selfextend_peer


__all__ = ["PEER_NAMES", "enable_peer", "disable_peer", "peer_settings", "peer_attention"]
