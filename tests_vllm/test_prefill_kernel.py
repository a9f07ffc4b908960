"""The SelfExtend prefill kernel (``selfextend.vllm.cpu_kernel.prefill``) against a float64 reference.

Requests in vLLM's flat token layout: request r's n_r queries sit at positions S_r - n_r .. S_r - 1
(whole prompts when n_r = S_r, chunks after cached tokens otherwise), each request with its own G.
The cache is filled by vLLM's own writer (``cpu_cache.PagedCache``: shuffled blocks, NaN in unused
slots) with keys *as stored*: key j rotated to its grouped position j // G. The reference below is
written out plainly, in float64, from that stored form: for the query at p, keys j <= p - w are
grouped (scored against the query rotated to p // G + w - w // G, as stored), keys p - w < j <= p
are neighbours (rotated back by j - j // G, scored against the query at p), keys j > p are not seen.
``test_decode_kernel.test_stored_form_is_selfextend`` proves that form equals SelfExtend's definition
by relative distances. No library position code is used.

Tolerance (per case): max |kernel - reference| <= 2 * max |plain attention - plain float64| + 1e-6,
"plain" being causal attention of the same queries over the same stored keys in the kernel's
precision (float32: torch; bfloat16: vLLM's stock kernel, which also rounds its output to bfloat16).

Every case also checks that the cache is bit for bit unchanged after the call.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from cpu_cache import PagedCache, built_kernels, kernel_grid
from selfextend.vllm.rotations import RotationTable
from test_decode_kernel import inv_freq, rotate64


def reference(q, starts, keys, values, groups, window, scale, freq, chunk: int = 256):
    """SelfExtend attention of every request's queries in float64: out [T, Hq, D], lse [T, Hq]
    (queries taken ``chunk`` at a time, to bound memory)."""
    outs, lses = [], []
    for r, (k, v) in enumerate(zip(keys, values)):
        S, hkv, _ = k.shape
        hq = q.shape[1]
        G = int(groups[r])
        j = torch.arange(S)
        rep = hq // hkv
        k_stored = k.double().repeat_interleave(rep, dim=1)  # [S, Hq, D]
        k_neighbour = rotate64(k, (j - j // G)[:, None].expand(S, hkv), freq).repeat_interleave(rep, dim=1)
        v64 = v.double().repeat_interleave(rep, dim=1)
        first = S - (starts[r + 1] - starts[r])  # position of the request's first query
        for t0 in range(starts[r], starts[r + 1], chunk):
            qr = q[t0: min(t0 + chunk, starts[r + 1])].double()  # [n, Hq, D]
            n = qr.shape[0]
            p = first + (t0 - starts[r]) + torch.arange(n)  # the queries' positions
            q_grouped = rotate64(qr, ((p // G + window - window // G) - p)[:, None].expand(n, hq), freq)
            grouped = (p[:, None] - j[None, :] >= window) if G > 1 else torch.ones(n, S, dtype=torch.bool)
            s_grouped = torch.einsum("nhd,shd->hns", q_grouped if G > 1 else qr, k_stored)
            s_neighbour = torch.einsum("nhd,shd->hns", qr, k_neighbour)
            s = torch.where(grouped, s_grouped, s_neighbour) * scale
            s = s.masked_fill(j[None, None, :] > p[None, :, None], float("-inf"))  # causal
            lse = torch.logsumexp(s, -1)  # [Hq, n]
            outs.append(torch.einsum("hns,shd->nhd", torch.exp(s - lse[..., None]), v64))
            lses.append(lse.T)
    return torch.cat(outs), torch.cat(lses)


def plain(q, starts, keys, values, scale, dtype, chunk: int = 256):
    """Causal attention of every request's queries over all its stored keys, in ``dtype``."""
    outs = []
    for r, (k, v) in enumerate(zip(keys, values)):
        S, rep = k.shape[0], q.shape[1] // k.shape[1]
        kk, vv = k.to(dtype).repeat_interleave(rep, dim=1), v.to(dtype).repeat_interleave(rep, dim=1)
        first = S - (starts[r + 1] - starts[r])
        for t0 in range(starts[r], starts[r + 1], chunk):
            qr = q[t0: min(t0 + chunk, starts[r + 1])].to(dtype)
            p = first + (t0 - starts[r]) + torch.arange(qr.shape[0])
            s = torch.einsum("nhd,shd->hns", qr, kk) * scale
            s = s.masked_fill(torch.arange(S)[None, None, :] > p[None, :, None], float("-inf"))
            outs.append(torch.einsum("hns,shd->nhd", torch.softmax(s, -1), vv))
    return torch.cat(outs)


# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    lens: tuple[int, ...]     # S per request
    queries: tuple[int, ...]  # n per request (n = S: a whole prompt)
    groups: tuple[int, ...]
    window: int
    hq: int = 9  # the bundled model: 9 query heads, 3 kv heads, head size 64
    hkv: int = 3
    d: int = 64
    rotary_dim: int | None = None  # default: d (full rotary)
    sharp: float = 1.0  # query scale: sharper softmax
    seed: int = 0


CASES = {
    "whole_prompts": Case((300, 200, 77), (300, 200, 77), (4, 2, 1), 64),
    "chunks_after_cache": Case((700, 450, 1000), (64, 200, 5), (3, 5, 2), 100, seed=1),
    "mixed": Case((2049, 300, 31, 100, 1, 129), (100, 300, 31, 1, 1, 129), (1, 2, 4, 5, 4, 1), 100, seed=2),
    "around_window": Case((63, 64, 65, 200, 64), (63, 64, 1, 137, 10), (4, 5, 2, 4, 3), 64, seed=3),  # S <, =, > w
    "window_37": Case((37, 38, 36, 500), (37, 20, 36, 333), (2, 5, 4, 4), 37, seed=4),  # w no multiple of B
    "few_queries_long_keys": Case((5000, 3000), (3, 2), (3, 1), 513, seed=5),  # keys cut in pieces, merged
    "partial_rotary": Case((900, 400), (300, 400), (4, 5), 100, rotary_dim=32, sharp=4.0, seed=6),
    "d128_r4": Case((600, 300), (100, 300), (3, 2), 129, hq=8, hkv=2, d=128, rotary_dim=64, seed=7),
    "d32_r2": Case((300, 129, 40), (120, 129, 40), (3, 2, 4), 32, hq=4, hkv=2, d=32, seed=8),  # tiny Llama
    "d256_r4": Case((700, 260), (200, 100), (3, 8), 128, hq=4, hkv=1, d=256, seed=9),  # Gemma 3 270M
    "r1": Case((500, 90), (250, 90), (3, 2), 64, hq=4, hkv=4, seed=10),
    "r8": Case((500, 90), (200, 90), (3, 1), 64, hq=16, hkv=2, d=128, seed=11),
}
BIG = {"engine_sized": Case((12000, 8193, 3000), (700, 2048, 3000), (2, 4, 3), 2048, seed=12)}  # slow
GRID = kernel_grid(CASES, BIG)


@pytest.fixture(scope="module")
def kernel():
    return built_kernels()


def make(case: Case, block: int, dtype: torch.dtype, poison: bool = True):
    """Random stored keys / values (representable in dtype), the queries of every request, their
    query_start_loc, and the filled cache."""
    g = torch.Generator().manual_seed(case.seed)
    keys = [torch.randn(s, case.hkv, case.d, generator=g).to(dtype).float() for s in case.lens]
    values = [torch.randn(s, case.hkv, case.d, generator=g).to(dtype).float() for s in case.lens]
    q = (torch.randn(sum(case.queries), case.hq, case.d, generator=g) * case.sharp).to(dtype)
    starts = torch.tensor([0, *case.queries]).cumsum(0).to(torch.int32)
    return keys, values, q, starts, PagedCache(keys, values, block, dtype, seed=case.seed, poison=poison)


def call(kernel, case: Case, cache: PagedCache, q, starts, table=None, **options):
    table = table if table is not None else RotationTable(inv_freq(case.rotary_dim or case.d), 8)  # grown there
    return kernel.prefill(q, cache.key_cache, cache.value_cache, starts, cache.seq_lens, cache.block_table,
                          torch.tensor(case.groups, dtype=torch.int32), case.window, case.d ** -0.5, table,
                          **options)


@pytest.mark.parametrize("name,block,dtype", GRID)
def test_kernel_matches_float64_reference(kernel, name, block, dtype):
    case = CASES.get(name) or BIG[name]
    keys, values, q, starts, cache = make(case, block, dtype)
    freq, scale = inv_freq(case.rotary_dim or case.d), case.d ** -0.5
    before = cache.checksum()
    out, lse = call(kernel, case, cache, q, starts)
    assert cache.checksum() == before, "the kernel changed the cache"
    ref, ref_lse = reference(q, starts.tolist(), keys, values, case.groups, case.window, scale, freq)
    err = (out.double() - ref).abs().max().item()
    plain64 = plain(q, starts.tolist(), keys, values, scale, torch.float64)
    if dtype == torch.float32:
        baseline = (plain(q, starts.tolist(), keys, values, scale, torch.float32).double() - plain64).abs().max().item()
    else:  # vLLM's own bfloat16 kernel on a cache without NaNs (it reads unused slots of a block)
        clean = PagedCache(keys, values, block, dtype, seed=case.seed)
        baseline = (clean.stock(q, scale, query_start_loc=starts).double() - plain64).abs().max().item()
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (q.shape[0], case.hq)
    assert err <= 2 * baseline + 1e-6, f"kernel error {err:.3e}, plain attention's {baseline:.3e}"
    lse_err = (lse.double() - ref_lse).abs().max().item()
    assert lse_err <= 1e-5 * max(1.0, ref_lse.abs().max().item()), f"log-sum-exp off by {lse_err:.3e}"


def test_comparison_can_fail(kernel):
    """The check above tells a right answer from a window off by one or another G (the kernel agrees
    only with the right reference); it would catch a key at a wrong position."""
    case = Case((700, 300), (200, 300), (4, 5), 100, seed=13)
    keys, values, q, starts, cache = make(case, 32, torch.float32)
    out, _ = call(kernel, case, cache, q, starts)
    freq, scale = inv_freq(64), 64 ** -0.5
    errors = {}
    for what, (window, groups) in {"right": (100, case.groups), "w+1": (101, case.groups), "w-1": (99, case.groups),
                                   "G+1": (100, [g + 1 for g in case.groups])}.items():
        ref, _ = reference(q, starts.tolist(), keys, values, groups, window, scale, freq)
        errors[what] = (out.double() - ref).abs().max().item()
    assert errors["right"] < 1e-5, errors
    assert min(errors["w+1"], errors["w-1"], errors["G+1"]) > 1e-3, errors


def test_one_query_per_request_equals_the_decode_kernel(kernel):
    """With n = 1 for every request the prefill kernel computes what the decode kernel does."""
    case = Case((2049, 700, 31, 1, 3000), (1, 1, 1, 1, 1), (1, 2, 4, 5, 3), 100, seed=14)
    _, _, q, starts, cache = make(case, 16, torch.float32)
    table = RotationTable(inv_freq(64), 3000)
    out, lse = call(kernel, case, cache, q, starts, table=table)
    want, want_lse = kernel.decode(q, cache.key_cache, cache.value_cache, cache.block_table, cache.seq_lens,
                                   torch.tensor(case.groups, dtype=torch.int32), case.window, 64 ** -0.5, table)
    torch.testing.assert_close(out, want, rtol=0, atol=2e-6)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=2e-5)


def test_keys_cut_in_pieces_merge_exactly(kernel):
    """Few queries over many keys: with many threads the kernel cuts each query tile's keys into
    pieces run on different threads and merges them by log-sum-exp; with one thread it does not.
    Both agree with the reference (and differ from each other in rounding only: the cut happened)."""
    case = Case((5000, 3000), (3, 2), (3, 1), 513, seed=17)
    keys, values, q, starts, cache = make(case, 128, torch.float32)
    ref, ref_lse = reference(q, starts.tolist(), keys, values, case.groups, case.window, 64 ** -0.5, inv_freq(64))
    threads = torch.get_num_threads()
    results = {}
    try:
        for n in (1, 8):
            torch.set_num_threads(n)
            results[n] = call(kernel, case, cache, q, starts)
    finally:
        torch.set_num_threads(threads)
    for out, lse in results.values():
        assert (out.double() - ref).abs().max().item() < 1e-5
        assert (lse.double() - ref_lse).abs().max().item() < 1e-4
    assert not torch.equal(results[1][0], results[8][0]), "8 threads did not cut the keys"


# ------------------------------------------------------------------------------------------------
# the call: out rows, strided queries, rows of no request, bad input
# ------------------------------------------------------------------------------------------------


def test_writes_only_its_rows_into_strided_out_from_strided_queries(kernel):
    """``out`` may be rows of a bigger tensor (vLLM's output) and the queries a view of a fused qkv
    tensor; tokens past query_start_loc[R] (another path's rows) are left alone, their lse -inf."""
    case = Case((500, 90), (40, 90), (4, 1), 64, seed=15)
    _, _, q, starts, cache = make(case, 16, torch.float32)
    table = RotationTable(inv_freq(64), 600)
    want, want_lse = call(kernel, case, cache, q, starts, table=table)
    n, hq, d = q.shape
    extra = 5  # rows of the step that are not the kernel's
    qkv = torch.randn(n + extra, hq * d + 2 * 3 * d)
    qkv[:n, : hq * d] = q.reshape(n, hq * d)
    query = qkv[:, : hq * d].view(n + extra, hq, d)  # row stride hq * d + 6 d
    rows = torch.full((n + extra + 1, hq, d + 8), 7.0)
    out = rows[1:, :, :d]  # strides ((d + 8) hq, d + 8, 1)
    got, lse = call(kernel, case, cache, query, starts, table=table, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(out[:n], want) and torch.equal(lse[:n], want_lse)
    assert (rows[0] == 7).all() and (out[n:] == 7).all() and (rows[..., d:] == 7).all()
    assert torch.isinf(lse[n:]).all() and (lse[n:] < 0).all()


def test_requests_without_queries_are_skipped(kernel):
    case = Case((300, 50, 200), (30, 0, 20), (4, 2, 3), 64, seed=16)
    _, _, q, starts, cache = make(case, 32, torch.float32)
    out, lse = call(kernel, case, cache, q, starts)
    keys, values, _, _, _ = make(case, 32, torch.float32)
    ref, _ = reference(q, starts.tolist(), keys, values, case.groups, case.window, 64 ** -0.5, inv_freq(64))
    assert (out.double() - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("change,message", [
    (dict(seq_lens=torch.tensor([40], dtype=torch.int64)), "must be int32"),
    (dict(block_table=torch.tensor([[0, 10_000, 1]], dtype=torch.int32)), "is not a block of the cache"),
    (dict(seq_lens=torch.tensor([4000], dtype=torch.int32)), "fit its block table"),
    (dict(seq_lens=torch.tensor([3], dtype=torch.int32)), "must cover its 5 new token\\(s\\)"),
    (dict(query_start_loc=torch.tensor([0, 6], dtype=torch.int32)), "within the 5 query tokens"),
    (dict(query_start_loc=torch.tensor([3, 2], dtype=torch.int32)), "non-decreasing"),
    (dict(group_size=0), "group_size\\[0\\] must be >= 1"),
    (dict(window=0), "window must be >= 1"),
    (dict(out=torch.empty(5, 9, 64, dtype=torch.bfloat16)), "out must be"),
    (dict(query=torch.randn(5, 9, 64).to(torch.bfloat16)), "dtypes differ"),
    (dict(query=torch.randn(5, 10, 64)), "multiple of kv heads"),
])
def test_bad_input_is_refused_with_a_clear_message(kernel, change, message):
    keys = [torch.randn(40, 3, 64)]
    cache = PagedCache(keys, keys, 16, torch.float32)
    args = dict(query=torch.randn(5, 9, 64), key_cache=cache.key_cache, value_cache=cache.value_cache,
                query_start_loc=torch.tensor([0, 5], dtype=torch.int32), seq_lens=cache.seq_lens,
                block_table=cache.block_table, group_size=4, window=16, scale=0.125,
                table=RotationTable(inv_freq(64), 64))
    before = cache.checksum()
    with pytest.raises(RuntimeError, match=message):
        kernel.prefill(**{**args, **change})
    assert cache.checksum() == before
