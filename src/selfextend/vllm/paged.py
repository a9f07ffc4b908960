"""SelfExtend over vLLM's paged KV cache in plain torch (worker process): reading one request's keys
and values out of the cache, and the exact attention of its new queries with the library's kernel.

What the cache holds. vLLM's model code rotates q and k at their ordinary positions before attention.
For a request with G > 1 the backend stores every key rotated on to its *grouped* position
``kg(j) = j // G`` (one more rotation by ``kg(j) - j``; RoPE composes), once, when it is written; a
stored key then never changes, so prefix caching (salted by G, see ``frontend``) and preemption work
unchanged. For a query at position ``p`` (window ``w``, ``qg(p) = p // G + w - w // G``):

    keys j <= p - w  (grouped)    query at qg(p), keys as stored
    keys j >  p - w  (neighbour)  query at p, keys moved back by j - kg(j) (the last n + w - 1 keys)

and one softmax over the merged row: the library's :func:`selfextend.attention.selfextend_row`, with
the stored keys as its grouped keys (:func:`attend_request`). The C++ kernels (``cpu_kernel``) do
the same over the paged cache without gathering anything; this is the path where they do not run.

Shapes: q ``[n, Hq, D]`` (tokens, query heads, head size), k/v ``[Hkv, m, D]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import Row, selfextend_row
from ..schedule import Schedule
from ..settings import Settings
from .rotations import RotationTable


@dataclass(frozen=True)
class CacheLayout:
    """Where element ``(slot t, dim d)`` of a block lives inside its ``[block_size * head_size]`` page.

    vLLM's CPU kernels store keys and values in an ISA-specific order (``vec``: keys transposed
    ``[D, B]``, values plain; ``amx``: both packed in pairs). ``key_index[t, d]`` / ``value_index[t, d]``
    are flat offsets inside a page, measured once by writing a probe through vLLM's own cache writer
    (``cpu_backend.probe_layout``)."""

    key_index: torch.Tensor    # [B, D] long
    value_index: torch.Tensor  # [B, D] long

    @classmethod
    def plain(cls, block_size: int, head_size: int) -> CacheLayout:
        """Pages in ``[B, D]`` order (what the tests and the CUDA cache use)."""
        index = torch.arange(block_size * head_size).view(block_size, head_size)
        return cls(index, index)

    def gather(self, key_cache, value_cache, blocks: torch.Tensor, length: int):
        """Keys and values of one sequence: ``blocks [nb]`` (its block table) -> k, v ``[Hkv, length, D]``."""
        nb, heads, b, d = len(blocks), key_cache.shape[1], key_cache.shape[2], key_cache.shape[3]
        k = key_cache[blocks].view(nb, heads, b * d)[:, :, self.key_index]  # [nb, Hkv, B, D], plain order
        v = value_cache[blocks].view(nb, heads, b * d)[:, :, self.value_index]
        k = k.transpose(0, 1).reshape(heads, nb * b, d)[:, :length]
        v = v.transpose(0, 1).reshape(heads, nb * b, d)[:, :length]
        return k, v


class StoredKeys:
    """The kernel's grouped keys (``attention.GroupedKeysFn``) of a request whose keys are stored at
    grouped positions already: the first ``last + 1`` of them, as stored."""

    def __init__(self, stored: torch.Tensor):
        self.stored = stored  # [Hkv, S, D]

    def __call__(self, group_size: float, last: int, available: int | None = None) -> torch.Tensor:
        return self.stored[:, : last + 1]


def attend_request(query: torch.Tensor, k_stored: torch.Tensor, v: torch.Tensor, settings: Settings,
                   table: RotationTable, scale: float) -> torch.Tensor:
    """Exact SelfExtend attention of one request's ``n`` newest queries over its ``S`` cached keys.

    query ``[n, Hq, D]`` at positions ``S - n .. S - 1`` (rotated at those positions), ``k_stored
    [Hkv, S, D]`` as the cache holds them (at ``j // G``), ``v [Hkv, S, D]``; ``settings`` carry the
    request's fixed G. Only the keys some query sees as neighbours (``f = max(0, S - n - w + 1)``
    onwards) are moved back to their own positions. Returns ``[n, Hq, D]`` in the query's dtype."""
    n, S, w, g = query.shape[0], v.shape[1], settings.window, settings.group_size
    first = max(0, S - n - w + 1)
    positions = torch.arange(first, S)
    back = positions - torch.div(positions, g, rounding_mode="floor")  # j - kg(j)
    near = table.rotate(k_stored[:, first:].transpose(0, 1), back).transpose(0, 1)  # [Hkv, S - first, D]
    k = torch.cat((k_stored[:, :first], near), dim=1)  # the kernel reads ordinary keys from `first` on only
    row = Row(query.transpose(0, 1), k, v, S - n, 0, scale)
    out = selfextend_row(row, Schedule(settings), table.rotary, StoredKeys(k_stored))  # [Hq, n, D]
    return out.transpose(0, 1)
