"""The torch pieces of the vLLM backend (no engine): a request's exact SelfExtend attention from keys
stored at grouped positions, against a float64 reference that scores every pair at the distance
SelfExtend gives it (the formula written out here)."""

from __future__ import annotations

import pytest
import torch

from selfextend.settings import Settings
from selfextend.vllm.paged import attend_request
from selfextend.vllm.rotations import RotationTable

INV_FREQ = 1.0 / (10000.0 ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32))  # head size 32


def relative_distance(i: int, j: int, window: int, group: int) -> int:
    """The distance SelfExtend lets query i see key j at, written out from the paper (Section 3)."""
    return i - j if i - j < window else (i // group + window - window // group) - j // group


def at(x, positions):
    """RoPE ``x [n, H, D]`` (raw) at ``positions [n]`` (rotate-half pairs), float64."""
    angles = positions.double()[:, None] * INV_FREQ[None, :]  # [n, 16]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    x = x.double()
    lo, hi = x[..., :16], x[..., 16:]
    return torch.cat((lo * cos - hi * sin, hi * cos + lo * sin), -1)


def reference(q_raw, k_raw, v, window, group, scale):
    """Naive SelfExtend in float64, every causal pair scored at its SelfExtend distance: ``[S, Hq, D]``."""
    S, hq, d = q_raw.shape
    r = hq // k_raw.shape[1]
    out = torch.zeros(S, hq, d, dtype=torch.float64)
    k0 = at(k_raw, torch.zeros(S))  # keys at position 0: the score depends on the distance only
    for i in range(S):
        dist = torch.tensor([relative_distance(i, j, window, group) for j in range(i + 1)])
        qi = at(q_raw[i].expand(i + 1, hq, d), dist)  # query moved by the distance, key at 0
        s = (qi * k0[: i + 1].repeat_interleave(r, dim=1)).sum(-1) * scale  # [i+1, Hq]
        p = torch.softmax(s, dim=0)
        out[i] = (p[..., None] * v[: i + 1].double().repeat_interleave(r, dim=1)).sum(0)
    return out


@pytest.mark.parametrize("S,n,window,group", [
    (90, 90, 16, 4),    # whole prefill
    (90, 1, 16, 4),     # decode (the decode kernel's torch fallback)
    (90, 37, 16, 3),    # chunked prefill: 53 tokens already cached; G does not divide w
    (12, 12, 16, 4),    # shorter than the window: everything is a neighbour
    (40, 5, 1, 2),      # window 1: only the token itself is a neighbour
])
def test_attend_request_matches_float64_reference(S, n, window, group):
    torch.manual_seed(0)
    hq, hkv, d, scale = 4, 2, 32, 32 ** -0.5
    q_raw, k_raw, v = torch.randn(S, hq, d) * 2, torch.randn(S, hkv, d) * 2, torch.randn(S, hkv, d)
    pos = torch.arange(S)
    q = at(q_raw, pos).float()  # what vLLM's rope hands the backend
    k_stored = at(k_raw, torch.div(pos, group, rounding_mode="floor")).float()  # what the backend stores: j // G
    table = RotationTable(INV_FREQ, S)
    out = attend_request(q[S - n:], k_stored.transpose(0, 1), v.transpose(0, 1), Settings(128, window, group),
                         table, scale)
    expected = reference(q_raw, k_raw, v, window, group, scale)[S - n:]
    assert (out.double() - expected).abs().max() < 2e-5


def test_rotation_table_lookups_equal_float64_rotations():
    table = RotationTable(INV_FREQ, 10)
    x = torch.randn(5, 3, 40)
    delta = torch.tensor([0, -3, 7, 250, -1000])  # grows the table on the way
    expected = torch.cat((at(x[..., :32], delta), x[..., 32:].double()), -1)
    assert (table.rotate(x, delta).double() - expected).abs().max() < 1e-5 and table.positions >= 1000
