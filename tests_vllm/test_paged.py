"""The torch pieces of the vLLM backend (no engine): exact SelfExtend attention of one request against
a float64 reference that scores every pair at the positions SelfExtend gives it."""

from __future__ import annotations

import pytest
import torch

from selfextend.rope import rotate, rotation
from selfextend.vllm.paged import Geometry, attend, rotated, selfextend_attention

INV_FREQ = 1.0 / (10000.0 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32))  # head size 32


def relative_distance(i: int, j: int, window: int, group: int) -> int:
    """The distance SelfExtend lets query i see key j at, written out from the paper (Section 3)."""
    return i - j if i - j < window else (i // group + window - window // group) - j // group


def at(x, positions):
    """RoPE ``x [n, H, D]`` (raw) at ``positions [n]``, float64."""
    cos, sin = rotation(positions.to(torch.float64), INV_FREQ.double())
    return rotate(x.double(), cos[:, None].double(), sin[:, None].double())


def reference(q_raw, k_raw, v, window, group, scale):
    """Naive SelfExtend in float64: q_raw ``[S, Hq, D]`` (only the last n used by the caller),
    every causal pair scored at the relative distance SelfExtend assigns it."""
    S, hq, d = q_raw.shape
    r = hq // k_raw.shape[1]
    out = torch.zeros(S, hq, d, dtype=torch.float64)
    k0 = at(k_raw, torch.zeros(S))  # keys at position 0: score depends only on the distance
    for i in range(S):
        dist = torch.tensor([relative_distance(i, j, window, group) for j in range(i + 1)])
        qi = at(q_raw[i].expand(i + 1, hq, d), dist)  # query moved by the distance, key at 0
        s = (qi * k0[: i + 1].repeat_interleave(r, dim=1)).sum(-1) * scale  # [i+1, Hq]
        p = torch.softmax(s, dim=0)
        out[i] = (p[..., None] * v[: i + 1].double().repeat_interleave(r, dim=1)).sum(0)
    return out


@pytest.mark.parametrize("S,n,window,group,block", [
    (90, 90, 16, 4, 32),    # whole prefill, several query blocks
    (90, 1, 16, 4, 512),    # decode
    (90, 37, 16, 3, 16),    # chunked prefill: 53 tokens already cached; G does not divide w
    (12, 12, 16, 4, 512),   # shorter than the window: everything is a neighbor
    (40, 5, 1, 2, 2),       # window 1: only the token itself is a neighbor
])
def test_selfextend_attention_matches_float64_reference(S, n, window, group, block):
    torch.manual_seed(0)
    hq, hkv, d, scale = 4, 2, 32, 32 ** -0.5
    q_raw, k_raw, v = torch.randn(S, hq, d) * 2, torch.randn(S, hkv, d) * 2, torch.randn(S, hkv, d)
    geometry = Geometry(window, group, INV_FREQ)
    pos = torch.arange(S)
    q_shift, k_shift = geometry.shifts(pos)
    q_plain = at(q_raw, pos).float()  # what vLLM's rope hands the backend
    k_plain = at(k_raw, pos).float()
    k_cached = rotated(k_plain, geometry.rotation(k_shift))  # what the backend stores
    q_grouped = rotated(q_plain, geometry.rotation(q_shift))
    first = max(0, S - n - window + 1)
    k_neighbor = rotated(k_cached[first:], geometry.rotation(-k_shift[first:]))  # back to ordinary
    out = selfextend_attention(q_plain[S - n:], q_grouped[S - n:], k_cached.transpose(0, 1),
                               k_neighbor.transpose(0, 1), v.transpose(0, 1), window, scale, block)
    expected = reference(q_raw, k_raw, v, window, group, scale)[S - n:]
    assert (out.double() - expected).abs().max() < 2e-5


def test_attend_fully_masked_row_is_empty():
    q, k, v = torch.randn(3, 4, 32), torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    out, lse = attend(q, k, v, 0.2, mask)
    assert torch.all(out[1] == 0) and torch.all(torch.isinf(lse[1]))
    assert torch.isfinite(lse[0]).all()
