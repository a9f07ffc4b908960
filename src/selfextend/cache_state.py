"""Grouped keys kept between forward calls, one store per transformers KV cache object.

Each decode step would otherwise rotate every cached key to its grouped position again (the official
implementation does). A key's grouped position never changes, so the rotated keys are kept and only
new keys are rotated. They must never go stale. A store trusts its rotated keys only for key indices
below ``valid_until[row]`` and lowers that bound at the start of every forward call that uses the
cache (whatever path the call takes):

* cache cropped, reset or rewritten (assisted decoding crops and regrows it, ``StaticCache.reset``):
  a forward call writes the cache from index ``q_offset`` on, so everything at or after it is new;
* rows reordered or selected (beam search, ``batch_select_indices``): the key at index
  ``valid_until - 1`` of the deepest SelfExtend layer is compared with the copy taken when it was
  last seen; a key that deep depends on every earlier token, so any change there invalidates the row;
* batch size changed, or SelfExtend enabled anew (other settings): everything is dropped.

Only caches whose layers hold index-aligned key tensors (transformers' ``DynamicLayer`` and
``StaticLayer``) are kept between calls; with any other cache (quantized, ...) grouped keys are
rebuilt in every call: slower, never wrong.
"""

from __future__ import annotations

import contextvars
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers.cache_utils import DynamicLayer, StaticLayer

from .attention import GroupedKeys

_KEEPABLE_LAYERS = (DynamicLayer, StaticLayer)


class CacheState:
    """SelfExtend's state for one KV cache: rotated grouped keys per (layer, row, G)."""

    def __init__(self, owner: str, batch: int):
        self.owner = owner  # the enable() call these keys were computed for
        self.batch = batch
        self.valid_until = [0] * batch  # rotated keys below this key index match the cache
        self.fingerprints: dict[int, tuple[int, torch.Tensor]] = {}  # row -> (key index, key [Hkv, D])
        self.buffers: dict[tuple[int, int], dict[float, GroupedKeys]] = {}  # (layer, row) -> {G: keys}
        self.checked_for = None  # the mask object of the forward call last checked (one per call)

    def key_cache(self, layer_idx: int, row: int) -> dict[float, GroupedKeys]:
        """The persistent ``{G: GroupedKeys}`` of one layer and batch row."""
        return self.buffers.setdefault((layer_idx, row), {})

    def begin_call(self, call, cache, fingerprint_layer: int, q_offset: int, batch: int) -> None:
        """Lower ``valid_until`` to what the cache still holds, once per forward call (``call`` is an
        object unique to it)."""
        if self.checked_for is call:
            return
        self.checked_for = call
        if batch != self.batch:
            self.__init__(self.owner, batch)
            return
        keys = _layer_keys(cache, fingerprint_layer)  # [B, Hkv, S, D] or None
        for b in range(batch):
            limit = min(self.valid_until[b], q_offset)
            seen = self.fingerprints.pop(b, None)
            if seen is not None and seen[0] < limit:
                index, key = seen
                if keys is None or keys.shape[2] <= index or not torch.equal(keys[b, :, index].to(key.device), key):
                    limit = 0  # rows reordered or rewritten
            self.valid_until[b] = limit
        for (_, row), per_group in self.buffers.items():
            for grouped in per_group.values():
                grouped.truncate(self.valid_until[row])

    def end_call(self, key: torch.Tensor, total: int) -> None:
        """After the deepest SelfExtend layer of a call: every key index ``< total`` is now known.
        ``key [B, Hkv, >= total, D]`` is that layer's key tensor (cache included)."""
        for b in range(key.shape[0]):
            self.fingerprints[b] = (total - 1, key[b, :, total - 1].detach().clone())
            self.valid_until[b] = total

    def nbytes(self) -> int:
        """Memory held by rotated keys (buffers may be larger than what is in use)."""
        return sum(g.buffer.numel() * g.buffer.element_size() for per_group in self.buffers.values()
                   for g in per_group.values() if g.buffer is not None)


def _layer_keys(cache, layer_idx: int) -> torch.Tensor | None:
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers) or type(layers[layer_idx]) not in _KEEPABLE_LAYERS:
        return None
    keys = getattr(layers[layer_idx], "keys", None)
    return keys if isinstance(keys, torch.Tensor) and keys.dim() == 4 else None


def keepable(cache, layer_idx: int) -> bool:
    """Whether grouped keys of this cache layer can be kept between calls (see the module docstring)."""
    layers = getattr(cache, "layers", None)
    return layers is not None and layer_idx < len(layers) and type(layers[layer_idx]) in _KEEPABLE_LAYERS


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache object -> CacheState
_LOCK = threading.Lock()  # several threads may decode with different caches at once


def state_for(cache, owner: str, batch: int, create: bool) -> CacheState | None:
    """The state of ``cache`` for the enable() call ``owner`` (made if ``create``), else None."""
    with _LOCK:
        state = _STATES.get(cache)
        if state is not None and state.owner != owner:
            state = None
            del _STATES[cache]
        if state is None and create:
            state = _STATES[cache] = CacheState(owner, batch)
        return state


def decode_stats(cache) -> dict[str, int]:
    """What SelfExtend keeps for ``cache``: ``grouped_key_bytes`` (memory of its rotated keys) and
    ``rotated_keys`` (keys rotated so far by the buffers it holds; decoding adds one per layer and
    row per step)."""
    with _LOCK:
        state = _STATES.get(cache)
    if state is None:
        return {"grouped_key_bytes": 0, "rotated_keys": 0}
    return {"grouped_key_bytes": state.nbytes(),
            "rotated_keys": sum(g.rotated for per_group in state.buffers.values() for g in per_group.values())}


# -- the G chosen for each sequence (Settings.for_sequence), kept with its KV cache ------------------
class SequenceGroups:
    """Per row of one KV cache: the length its G was chosen for (None = not chosen yet)."""

    def __init__(self, owner: str, batch: int):
        self.owner, self.lengths = owner, [None] * batch


_SEQUENCES_ATTR = "_selfextend_sequences"  # kept on the cache object itself, so copies of the cache carry it


def sequence_groups(cache, owner: str, batch: int) -> SequenceGroups:
    """The SequenceGroups of ``cache`` for the enable() call ``owner`` (fresh if another call or batch
    size wrote it). Kept as an attribute of the cache, so a copy (``copy.deepcopy(cache)``, the prompt
    reuse pattern of transformers' docs) keeps the G chosen for its rows."""
    with _LOCK:
        groups = getattr(cache, _SEQUENCES_ATTR, None)
        if groups is None or groups.owner != owner or len(groups.lengths) != batch:
            groups = SequenceGroups(owner, batch)
            setattr(cache, _SEQUENCES_ATTR, groups)
        return groups


# -- the length a sequence will have, announced before it arrives in pieces ---------------------------
_PROMPT_LENGTHS: contextvars.ContextVar[tuple[int, ...] | None] = contextvars.ContextVar(
    "selfextend_prompt_lengths", default=None)


@contextmanager
def prompt_length(lengths: int | Sequence[int]) -> Iterator[None]:
    """Within the block, a sequence that starts (a forward call that holds its first token) has its G
    chosen for ``lengths`` tokens -- one number, or one per batch row -- instead of for the tokens of
    that first call: a prompt fed in chunks, or a generation without a KV cache (each pass holds the
    whole sequence, and G must stay the one chosen for the prompt). ``model.generate`` of an enabled
    model does this itself; the library's own chunked prefill too. Per thread and asyncio task."""
    values = (lengths,) if isinstance(lengths, int) else tuple(int(n) for n in lengths)
    if not values or any(isinstance(n, bool) or n < 1 for n in values):
        raise ValueError(f"prompt lengths must be positive integers, got {lengths!r}")
    token = _PROMPT_LENGTHS.set(values)
    try:
        yield
    finally:
        _PROMPT_LENGTHS.reset(token)


def announced_length(row: int, batch: int) -> int | None:
    """The length announced by :func:`prompt_length` for batch ``row`` of ``batch`` rows (rows repeated
    in equal runs, as beam search and ``num_return_sequences`` repeat them, share their prompt's)."""
    values = _PROMPT_LENGTHS.get()
    if values is None:
        return None
    if len(values) == 1:
        return values[0]
    if batch % len(values):
        raise ValueError(f"{len(values)} prompt lengths were announced for a batch of {batch} rows")
    return values[row // (batch // len(values))]
