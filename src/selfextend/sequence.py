"""What SelfExtend keeps for the sequences of one KV cache: each row's schedule and its grouped keys.

One :class:`SequenceState` per transformers cache object, kept as an attribute of that object, so it
lives and dies with the cache and copies of the cache (``copy.deepcopy``, transformers' prompt-reuse
pattern) carry it. For each batch row it holds

* the row's :class:`~selfextend.schedule.Schedule` (which G where), chosen when a forward call holds
  the row's first token -- for the length announced with :func:`prompt_length` if any, else for that
  call's tokens -- and read back by every later call on the cache;
* the row's keys rotated to their grouped positions (:class:`GroupedKeys`, per layer and G), so a
  decode step rotates only its new keys instead of the whole cache again (the official implementation
  re-rotates every step). Calls of at most ``DECODE_ROWS`` queries keep them.

The contract, per forward call: :meth:`SequenceState.begin_call` (once, by the first layer: drop what
the cache no longer holds, choose the schedules of rows that start) -> :meth:`SequenceState.grouped_keys`
per layer and row -> :meth:`SequenceState.end_call` (after the deepest SelfExtend layer).

Kept keys must never go stale. They are trusted only for key indices below ``valid_until[row]``,
lowered at every call: to ``q_offset`` (a crop, reset or regrow rewrites the cache from there; beam
search's ``batch_select_indices`` too), and to 0 when the key at the last index seen of the deepest
SelfExtend layer changed (rows reordered). A new batch size or ``enable`` call starts afresh. Caches
whose layers do not hold index-aligned keys (quantized) keep schedules but no keys: grouped keys are
rebuilt in every call there, slower, never wrong.
"""

from __future__ import annotations

import contextvars
import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers.cache_utils import DynamicLayer, StaticLayer

from .attention import KEYS_AHEAD, needs_grad
from .positions import grouped_positions
from .rope import Rotary
from .schedule import Schedule
from .settings import Settings

_KEEPABLE_LAYERS = (DynamicLayer, StaticLayer)
_STATE_ATTR = "_selfextend_sequences"  # the attribute of the cache object that holds its SequenceState
_CALLS = itertools.count()  # serial numbers of forward calls (a call is checked once, by its first layer)


# ------------------------------------------------------------------------------------------------
# keys at grouped positions
# ------------------------------------------------------------------------------------------------


class GroupedKeys:
    """Keys of one layer and batch row rotated to their grouped positions ``p // G`` for one G.

    Key index ``first`` is at position ``first_position``; the model rotated every key at its position
    ``+ shift``. The buffer has the keys' dtype and grows by an eighth when full. A key's grouped
    position never changes, so keys are rotated once and appended to."""

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
        if self.count >= need:
            return self.buffer[:, :need]
        upto = need if available is None else max(need, min(need + KEYS_AHEAD - 1, available - self.first + 1))
        new = self._rotate(k[:, self.first + self.count : self.first + upto], settings, rotary)  # [Hkv, upto - count, D]
        if needs_grad(new) or (self.buffer is not None and self.buffer.requires_grad):
            # autograd: earlier slices of the buffer may be saved for backward; never write into it
            self.buffer = new if not self.count else torch.cat((self.buffer[:, : self.count], new), dim=1)
        else:
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

    def _rotate(self, k: torch.Tensor, settings: Settings, rotary: Rotary) -> torch.Tensor:
        """``k [H, n, D]``, the keys after the ones held, moved to their grouped positions."""
        pos = torch.arange(self.first_position + self.count, self.first_position + self.count + k.shape[1],
                           device=k.device)
        _, target = grouped_positions(pos, settings.window, self.group_size, settings.mode)
        return rotary.rotate_by(k, target - (pos + self.shift).to(torch.float64))


class RowKeys:
    """The grouped keys of one layer and batch row, as the kernel asks for them
    (``attention.GroupedKeysFn``): one :class:`GroupedKeys` per G in ``store``; smaller G are dropped
    when a larger one comes (positions only grow, so an automatic G never returns to a smaller one)."""

    def __init__(self, store: dict, k: torch.Tensor, first_key: int, first_position: int, shift: int,
                 settings: Settings, rotary: Rotary):
        self.store, self.k, self.layout = store, k, (first_key, first_position, shift)
        self.settings, self.rotary = settings, rotary

    @classmethod
    def for_row(cls, row, settings: Settings, rotary: Rotary, store: dict | None = None) -> RowKeys:
        """The grouped keys of a kernel :class:`~selfextend.attention.Row` (kept in ``store``, or fresh)."""
        return cls({} if store is None else store, row.k, row.first_key, row.first_key_position, row.shift, settings,
                   rotary)

    def __call__(self, group_size: float, last: int, available: int | None = None) -> torch.Tensor:
        keys = self.store.get(group_size)
        if keys is None or not keys.serves(*self.layout):
            keys = self.store[group_size] = GroupedKeys(*self.layout, group_size)
            for g in [g for g in self.store if g < group_size]:
                del self.store[g]
        return keys.get(self.k, last, self.settings, self.rotary, available)


# ------------------------------------------------------------------------------------------------
# the state of one cache's sequences
# ------------------------------------------------------------------------------------------------


class SequenceState:
    """SelfExtend's state for one KV cache: per batch row, its schedule and its grouped keys."""

    def __init__(self, owner: str, batch: int, keeps_keys: bool):
        self.owner = owner  # the enable() call this state was made for
        self.batch = batch
        self.keeps_keys = keeps_keys  # the cache holds index-aligned keys (not quantized)
        self.schedules: list[Schedule | None] = [None] * batch  # None: no call has held the row's start yet
        self.valid_until = [0] * batch  # grouped keys below this key index match the cache
        self.fingerprints: dict[int, tuple[int, torch.Tensor]] = {}  # row -> (key index, key [Hkv, D])
        self.keys: dict[tuple[int, int], dict[float, GroupedKeys]] = {}  # (layer, row) -> {G: keys}
        self.call = None  # (serial of the call checked last, its schedules)

    def begin_call(self, call: int, cache, settings: Settings, starts: list[tuple[bool, int]], q_offset: int,
                   fingerprint_layer: int) -> list[Schedule]:
        """Once per forward call (``call`` its serial number; later layers get the same answer): drop
        grouped keys the cache no longer backs and return each row's schedule. ``starts[b]`` is
        ``(the call holds row b's first token, the row's length so far)``."""
        if self.call is not None and self.call[0] == call:
            return self.call[1]
        self._trim(cache, q_offset, fingerprint_layer)
        for b, (starts_here, length) in enumerate(starts):
            if starts_here:
                self.schedules[b] = Schedule.for_sequence(settings, announced_length(b, self.batch) or length)
            elif self.schedules[b] is None:  # a sequence this state never saw start: G per position
                self.schedules[b] = Schedule.for_sequence(settings, None)
        self.call = (call, list(self.schedules))
        return self.call[1]

    def grouped_keys(self, layer: int, row: int, k: torch.Tensor, first_key: int, first_position: int, shift: int,
                     settings: Settings, rotary: Rotary, keep: bool) -> RowKeys:
        """The kernel's source of grouped keys for one layer and row of this call's key tensor ``k``:
        kept for the next call when ``keep`` (and the cache allows it), else made for this call only."""
        store = self.keys.setdefault((layer, row), {}) if keep and self.keeps_keys else {}
        return RowKeys(store, k, first_key, first_position, shift, settings, rotary)

    def end_call(self, key: torch.Tensor, total: int) -> None:
        """After the deepest SelfExtend layer of a call: every key index ``< total`` is now known.
        ``key [B, Hkv, >= total, D]`` is that layer's key tensor (cache included)."""
        if not self.keeps_keys:
            return
        for b in range(key.shape[0]):
            self.fingerprints[b] = (total - 1, key[b, :, total - 1].detach().clone())
            self.valid_until[b] = total

    def _trim(self, cache, q_offset: int, fingerprint_layer: int) -> None:
        """Lower ``valid_until`` to what the cache still holds (see the module docstring) and cut the
        grouped keys to it."""
        keys = _layer_keys(cache, fingerprint_layer)  # [B, Hkv, S, D] or None
        for b in range(self.batch):
            limit = min(self.valid_until[b], q_offset)
            seen = self.fingerprints.pop(b, None)
            if seen is not None and seen[0] < limit:
                index, key = seen
                if keys is None or keys.shape[2] <= index or not torch.equal(keys[b, :, index].to(key.device), key):
                    limit = 0  # rows reordered or rewritten
            self.valid_until[b] = limit
        for (_, row), per_group in self.keys.items():
            for grouped in per_group.values():
                grouped.truncate(self.valid_until[row])

    def nbytes(self) -> int:
        """Memory held by grouped keys (buffers may be larger than what is in use)."""
        return sum(g.buffer.numel() * g.buffer.element_size() for per_group in self.keys.values()
                   for g in per_group.values() if g.buffer is not None)


def state_for(cache, owner: str, batch: int, fingerprint_layer: int) -> SequenceState:
    """The :class:`SequenceState` of ``cache`` for the enable() call ``owner`` (made afresh if another
    call or batch size made the one it holds)."""
    state = getattr(cache, _STATE_ATTR, None)
    if state is None or state.owner != owner or state.batch != batch:
        state = SequenceState(owner, batch, keepable(cache, fingerprint_layer))
        setattr(cache, _STATE_ATTR, state)
    return state


def new_call() -> int:
    """A serial number for one forward call."""
    return next(_CALLS)


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


def decode_stats(cache) -> dict[str, int]:
    """What SelfExtend keeps for ``cache``: ``grouped_key_bytes`` (memory of its rotated keys) and
    ``rotated_keys`` (keys rotated so far by the buffers it holds; decoding adds one per layer and
    row per step)."""
    state = getattr(cache, _STATE_ATTR, None)
    if state is None:
        return {"grouped_key_bytes": 0, "rotated_keys": 0}
    return {"grouped_key_bytes": state.nbytes(),
            "rotated_keys": sum(g.rotated for per_group in state.keys.values() for g in per_group.values())}


# ------------------------------------------------------------------------------------------------
# the length a sequence will have, announced before it arrives in pieces
# ------------------------------------------------------------------------------------------------
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
