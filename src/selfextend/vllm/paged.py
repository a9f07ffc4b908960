"""SelfExtend over vLLM's paged KV cache, in plain torch (no vLLM import): rotations, cache access,
and the exact attention of one request's queries.

What the cache holds. vLLM's model code rotates q and k at their ordinary positions before
attention. The SelfExtend backend stores every key rotated on to its *grouped* position
``kg(j) = j // G`` (one more rotation by ``kg(j) - j``; RoPE composes), once, when it is written.
A stored key then never changes, so prefix caching and preemption work unchanged.

For a query at position ``p`` (window ``w``, grouped query position ``qg(p) = p // G + w - w // G``):

    keys j <= p - w  (grouped)   query rotated to qg(p), keys as stored
    keys j >  p - w  (neighbor)  query at p, keys rotated back by j - kg(j) (at most w + n of them)

and one softmax over the merged row (partial attentions merged by their log-sum-exp).

Shapes: q ``[n, Hq, D]`` (tokens, query heads, head size), k/v ``[Hkv, m, D]``; GQA query head ``h``
reads key head ``h // (Hq // Hkv)``, as in vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..positions import grouped_positions
from ..rope import rotate, rotation

NEG_INF = float("-inf")
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


# ------------------------------------------------------------------------------------------------
# positions and rotations
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """SelfExtend's position maps for one engine plus the model's RoPE frequencies."""

    window: int
    group_size: int
    inv_freq: torch.Tensor  # [rotary_dim // 2] float32, the model's own inverse frequencies

    def shifts(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(qg(p) - p, kg(p) - p) as float64 tensors shaped like ``positions``."""
        p = positions.to(torch.float64)
        q_pos, k_pos = grouped_positions(p, self.window, self.group_size, "floor")
        return q_pos - p, k_pos - p

    def rotation(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[n, 1, rotary_dim]`` (float32) of a rotation by ``delta [n]`` positions,
        shaped to rotate tensors ``[n, heads, D]``."""
        cos, sin = rotation(delta, self.inv_freq)
        return cos[:, None, :], sin[:, None, :]


def rotated(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``x [n, heads, D]`` rotated by ``cos_sin`` (from :meth:`Geometry.rotation`), in x's dtype
    (computed in float32: one rounding for half-precision models)."""
    cos, sin = cos_sin
    return rotate(x.float(), cos, sin).to(x.dtype)


# ------------------------------------------------------------------------------------------------
# reading and writing keys in the paged cache
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheLayout:
    """Where element ``(slot t, dim d)`` of a block lives inside its ``[block_size * head_size]`` page.

    vLLM's CPU kernels store keys and values in an ISA-specific order (float32 ``vec``: keys
    transposed ``[D, B]``, values plain; bfloat16 ``amx``: both packed in pairs).
    ``key_index[t, d]`` / ``value_index[t, d]`` are flat offsets inside a page, measured once by
    writing a probe through vLLM's own cache writer (``cpu_backend.probe_layout``)."""

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

    def is_transposed(self) -> bool:
        """Keys stored as ``[D, B]`` pages (vLLM's ``vec`` kernels)."""
        return torch.equal(self.key_index, _transposed(*self.key_index.shape))

    def orient(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-slot rotation tables ``[Mb, B, rd / 2]`` laid out as :meth:`rotate_key_pages` reads them
        (contiguous: broadcasting strided tables is several times slower); once per step."""
        if self.is_transposed():
            return cos.transpose(1, 2)[:, None].contiguous(), sin.transpose(1, 2)[:, None].contiguous()
        return cos[:, None].contiguous(), sin[:, None].contiguous()

    def rotate_key_pages(self, pages: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Key pages ``[Mb, Hkv, B, D]`` (raw page order, as copied out of the cache) with slot ``t``
        of page ``m`` rotated by the tables from :meth:`orient`; returned in the same raw order."""
        mb, heads, b, d = pages.shape
        if self.is_transposed():  # [D, B] pages: rotate rows d and d + rd/2
            return _rotate_pairs(pages.view(mb, heads, d, b), cos, sin, dim=2).view(mb, heads, b, d)
        flat = pages.reshape(mb, heads, b * d)
        plain = _rotate_pairs(flat[:, :, self.key_index], cos, sin, dim=3)  # [Mb, Hkv, B, D]
        out = torch.empty_like(flat)
        out[:, :, self.key_index] = plain
        return out.view(mb, heads, b, d)


def _transposed(block_size: int, head_size: int) -> torch.Tensor:
    """The key index of ``[D, B]`` pages."""
    return torch.arange(head_size)[None, :] * block_size + torch.arange(block_size)[:, None]


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dim: int) -> torch.Tensor:
    """RoPE rotation of the pairs ``(i, i + h)`` along ``dim`` (``h = cos.shape[dim]``; dims past
    ``2h`` pass unchanged), computed in float32; cos/sin broadcast against the first ``h`` entries."""
    h = cos.shape[dim]
    lo, hi = x.narrow(dim, 0, h).float(), x.narrow(dim, h, h).float()
    out = x.clone() if x.shape[dim] > 2 * h or x.dtype != torch.float32 else torch.empty_like(x)
    out_lo, out_hi = out.narrow(dim, 0, h), out.narrow(dim, h, h)
    if x.dtype == torch.float32:  # in place, four passes
        torch.mul(lo, cos, out=out_lo).addcmul_(hi, sin, value=-1)
        torch.mul(hi, cos, out=out_hi).addcmul_(lo, sin)
    else:
        out_lo.copy_(lo * cos - hi * sin)
        out_hi.copy_(hi * cos + lo * sin)
    return out


# ------------------------------------------------------------------------------------------------
# attention pieces with their log-sum-exp, and their merge
# ------------------------------------------------------------------------------------------------


def attend(q, k, v, scale: float, mask: torch.Tensor | None = None):
    """Softmax attention of ``q [n, Hq, D]`` over ``k, v [Hkv, m, D]``; ``mask [n, m]`` bool
    (True = attend) or None. Returns ``(out [n, Hq, D], lse [n, Hq] float32)``; a row that may
    attend to nothing gets ``out = 0, lse = -inf``."""
    if k.shape[1] == 0:  # no keys at all (torch's CPU kernel would divide by zero)
        return torch.zeros_like(q), torch.full(q.shape[:2], NEG_INF, device=q.device)
    if _FLASH_CPU is not None and q.device.type == "cpu":
        bias = None
        if mask is not None:
            bias = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, NEG_INF)[None, None]
        out, lse = _FLASH_CPU(q.transpose(0, 1)[None], k[None], v[None], 0.0, False, attn_mask=bias, scale=scale)
        out, lse = out[0].transpose(0, 1), lse[0].transpose(0, 1).float()  # [n, Hq, D], [n, Hq]
    else:
        out, lse = _attend_matmul(q, k, v, scale, mask)
    if mask is not None:
        empty = ~mask.any(dim=-1)  # [n]
        if bool(empty.any()):
            lse = lse.masked_fill(empty[:, None], NEG_INF)
            out = out.masked_fill(empty[:, None, None], 0.0)
    return out, lse


def _attend_matmul(q, k, v, scale, mask):
    """:func:`attend` by explicit matmuls in float32 (devices without torch's CPU flash kernel)."""
    r = q.shape[1] // k.shape[0]
    kk = k.float().repeat_interleave(r, dim=0)  # [Hq, m, D]
    vv = v.float().repeat_interleave(r, dim=0)
    s = torch.matmul(q.float().transpose(0, 1), kk.transpose(-1, -2)) * scale  # [Hq, n, m]
    if mask is not None:
        s = s.masked_fill(~mask, NEG_INF)
    lse = torch.logsumexp(s, dim=-1)  # [Hq, n]
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.matmul(p, vv).transpose(0, 1).to(q.dtype)  # [n, Hq, D]
    return out, lse.transpose(0, 1)


def merge(parts):
    """Merge partial attentions ``[(out [n, H, D], lse [n, H]), ...]`` over disjoint key sets into the
    attention over their union: one softmax over the whole row."""
    if len(parts) == 1:
        return parts[0][0]
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)  # [n, H]
    safe = torch.where(torch.isinf(lse), 0.0, lse)
    out = 0.0
    for part_out, part_lse in parts:
        out = out + part_out.float() * torch.exp(part_lse - safe)[..., None]
    return out.to(parts[0][0].dtype)


# ------------------------------------------------------------------------------------------------
# one request: exact SelfExtend attention of its new queries
# ------------------------------------------------------------------------------------------------


def selfextend_attention(q_plain, q_grouped, k_grouped, k_neighbor, v, window: int, scale: float,
                         block: int = 512) -> torch.Tensor:
    """SelfExtend attention of one request's ``n`` newest queries over its ``S`` keys.

    q_plain / q_grouped ``[n, Hq, D]``  the queries at positions ``S - n .. S - 1``, rotated at their
                                        ordinary / grouped query positions
    k_grouped ``[Hkv, S, D]``           every key at its grouped position (as cached)
    k_neighbor ``[Hkv, S - f, D]``      keys ``f .. S - 1`` at ordinary positions, ``f = max(0, S - n - w + 1)``
    v ``[Hkv, S, D]``

    Queries go in blocks of ``block`` rows; for rows at positions ``a .. b`` the keys split into::

        0 .. a-w      grouped for every row            (one unmasked call)
        a-w+1 .. b-w  grouped for some rows            (masked: j <= p - w)
        a-w+1 .. b    neighbors of some rows           (masked: p - w < j <= p)

    Returns ``[n, Hq, D]``."""
    n, S = q_plain.shape[0], v.shape[1]
    first_neighbor = max(0, S - n - window + 1)
    out = torch.empty_like(q_plain)
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        a, b = S - n + r0, S - n + r1 - 1  # positions of the first and last row
        rows = torch.arange(a, b + 1)[:, None]  # [rows, 1]
        parts = []
        if a - window >= 0:
            parts.append(attend(q_grouped[r0:r1], k_grouped[:, : a - window + 1], v[:, : a - window + 1], scale))
        lo, hi = max(0, a - window + 1), b - window
        if hi >= lo:
            keys = torch.arange(lo, hi + 1)[None, :]
            parts.append(attend(q_grouped[r0:r1], k_grouped[:, lo : hi + 1], v[:, lo : hi + 1], scale,
                                mask=keys <= rows - window))
        lo = max(0, a - window + 1)
        keys = torch.arange(lo, b + 1)[None, :]
        parts.append(attend(q_plain[r0:r1], k_neighbor[:, lo - first_neighbor : b - first_neighbor + 1],
                            v[:, lo : b + 1], scale, mask=(keys > rows - window) & (keys <= rows)))
        out[r0:r1] = merge(parts)
    return out
