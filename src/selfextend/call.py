"""One forward call of an enabled model, as the attention layers see it.

transformers asks the registered mask function for each mask type once per forward call; SelfExtend
answers with a :class:`DeferredMask`: the mask factory's arguments, never an ``L x L`` tensor. The
same object reaches every attention layer of the call as its ``attention_mask``, so it is where the
call keeps what its layers share: the positions of each batch row (:func:`row_layouts`, computed
once), the KV cache the call uses (handed over by a forward pre-hook on each attention module:
transformers passes the cache to the module, not to the attention function), and the state of the
call's sequences (:class:`~selfextend.sequence.SequenceState`) when there is no cache to keep it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from .sequence import new_call


@dataclass(frozen=True)
class RowLayout:
    """Where one batch row's sequence sits in the key tensor."""

    first_key: int  # index of the row's first real key: its position 0 (= left-padding keys before it)
    shift: int  # the model rotated q/k at ``position + shift`` (position_ids need not start at 0)
    last_position: int  # position of this call's last query
    length: int  # tokens of the sequence so far: last_position + 1 less any right padding


class DeferredMask:
    """The arguments of transformers' mask factory, kept instead of the ``[B, 1, Lq, Lk]`` tensor it
    would build, plus what SelfExtend derives from them once per forward call.

    With a compileable cache (``StaticCache``) ``generate`` builds the mask itself and passes it back
    into the model, which calls the mask factory again with it as ``attention_mask``; ``ndim`` and
    ``shape`` describe the mask this object stands for, so transformers passes it through untouched.
    """

    ndim = 4

    def __init__(self, kwargs: dict):
        padding = kwargs.get("attention_mask")
        if isinstance(padding, DeferredMask):
            padding = padding.padding
        kwargs = {**kwargs, "attention_mask": padding}
        for name in ("q_offset", "kv_offset"):  # StaticCache passes tensors that its update() increments
            if isinstance(kwargs.get(name), torch.Tensor):
                kwargs[name] = int(kwargs[name])
        self.kwargs = kwargs
        self.padding: torch.Tensor | None = padding  # [B, >= kv_length] bool, True = real token
        self.q_offset: int = int(kwargs.get("q_offset") or 0)  # keys already in the cache
        self.kv_offset: int = int(kwargs.get("kv_offset") or 0)  # absolute index of key tensor index 0
        self.local_size: int | None = kwargs.get("local_size")  # sliding window of this mask, if any
        self.shape = (kwargs.get("batch_size"), 1, kwargs.get("q_length"), kwargs.get("kv_length"))
        self._built = {}
        self._layouts = None  # (position_ids, lq, layouts) of the first layer that asked
        self.serial = new_call()  # tells the layers of one call from those of the next
        self._cache = None  # weak reference to the call's KV cache (hand_over_cache)
        self.transient = None  # the SequenceState of a call without a cache

    @property
    def cache(self):
        """The KV cache of this call, or None."""
        return self._cache() if self._cache is not None else None

    def build(self, implementation: str):
        """The mask the original attention implementation would have received."""
        if implementation not in self._built:
            self._built[implementation] = ALL_MASK_ATTENTION_FUNCTIONS[implementation](**self.kwargs)
        return self._built[implementation]

    def layouts(self, position_ids: torch.Tensor | None, batch: int, lq: int) -> list[RowLayout]:
        """Per batch row: where the sequence starts and how it was rotated (computed once per call)."""
        if self._layouts is None or self._layouts[0] is not position_ids or self._layouts[1] != lq:
            self._layouts = (position_ids, lq, row_layouts(self.padding, position_ids, self.q_offset, batch, lq))
        return self._layouts[2]


def row_layouts(padding, position_ids, q_offset: int, batch: int, lq: int) -> list[RowLayout]:
    """Positions of each row of a call with ``lq`` queries after ``q_offset`` cached keys.

    A row's first real token is its position 0: left padding (``padding`` False before the first
    True) is skipped, as ``generate`` does. Trailing padding (right padding) is allowed; a gap inside
    a sequence is refused. ``position_ids [B or 1, lq]`` (default ``q_offset + arange(lq)``) are the
    positions the model rotated q and k at; they must be consecutive over the row's real queries,
    and any constant offset from the real positions is handled as ``shift``."""
    total = q_offset + lq
    if padding is None:
        starts, ends = [0] * batch, [total] * batch
    else:
        real = padding[:, :total].to("cpu", torch.bool)  # [B, total]
        starts, ends = [], []
        for b in range(batch):
            where = real[b].nonzero().flatten()
            if len(where) and not bool(real[b, int(where[0]) : int(where[-1]) + 1].all()):
                raise NotImplementedError(
                    "SelfExtend needs each sequence's tokens to be contiguous in the attention mask (left or "
                    "right padding is fine); this mask has a gap inside a sequence")
            starts.append(int(where[0]) if len(where) else total)
            ends.append(int(where[-1]) + 1 if len(where) else total)
    if position_ids is None:
        rotated = torch.arange(q_offset, total)[None].expand(batch, lq)
    else:
        rotated = position_ids.to("cpu").expand(batch, lq)
    layouts = []
    for b, first_key in enumerate(starts):
        first_row = max(0, first_key - q_offset)  # this call's first query that is a real token
        own = rotated[b, first_row:]
        if len(own) and not torch.equal(own - own[0], torch.arange(len(own))):
            raise NotImplementedError(
                "SelfExtend needs consecutive position_ids within each sequence (left padding is fine); "
                "packed sequences or custom position_ids are not supported")
        last_position = total - 1 - first_key
        shift = int(rotated[b, -1]) - last_position if len(own) else 0
        layouts.append(RowLayout(first_key, shift, last_position, max(0, ends[b] - first_key)))
    return layouts


@torch.compiler.disable  # under torch.compile too: it returns a Python object, not a tensor
def selfextend_mask(**kwargs) -> DeferredMask:
    return DeferredMask(kwargs)


def hand_over_cache(module, args, kwargs) -> None:
    """Forward pre-hook on each attention module: the call's KV cache, for the attention function.
    (``cache``; ``past_key_values`` before transformers 5.24; GPT-NeoX passes ``layer_past``.)"""
    mask = kwargs.get("attention_mask")
    cache = kwargs.get("cache", kwargs.get("past_key_values", kwargs.get("layer_past")))
    if isinstance(mask, DeferredMask) and cache is not None and mask._cache is None:
        mask._cache = weakref.ref(cache)


def remove_hand_over(model) -> None:
    """Remove :func:`hand_over_cache` from every module of ``model`` (what ``disable`` undoes)."""
    for module in model.modules():
        for hook_id, hook in list(module._forward_pre_hooks.items()):
            if hook is hand_over_cache:
                del module._forward_pre_hooks[hook_id]
                module._forward_pre_hooks_with_kwargs.pop(hook_id, None)
