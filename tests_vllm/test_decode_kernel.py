"""The SelfExtend decode kernel (``selfextend.vllm.cpu_kernel.decode``) against a float64 reference,
and the kernels' loader (build cache, switch, failures).

The cache is filled by vLLM's own writer (``cpu_cache.PagedCache``: shuffled blocks, NaN in unused
slots) with keys *as stored*: key j rotated to its grouped position j // G. The reference below is
written out plainly, in float64, from that stored form (grouped keys scored against qg, neighbour keys
rotated back by delta_j = j - j // G and scored against qp); ``test_stored_form_is_selfextend`` proves
that form equals SelfExtend's definition by relative distances. No library position code is used.

Tolerance (per case): max |kernel - reference| <= 2 * max |plain attention - plain float64| + 1e-6,
where "plain" is ordinary attention of the same queries over the same stored keys in the kernel's
precision (float32: torch; bfloat16: vLLM's stock kernel, which also rounds its output to bfloat16).
A key at the wrong position moves the output by 1e-2 and more (``test_comparison_can_fail``).

Every case also checks that the cache is bit for bit unchanged after the call.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cpu_cache import PagedCache, built_kernels, kernel_grid
from selfextend.vllm import cpu_kernel
from selfextend.vllm.rotations import RotationTable

ROOT = Path(__file__).resolve().parent.parent


def inv_freq(rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)


def rotate64(x: torch.Tensor, delta: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    """``x [..., D]`` in float64 rotated by ``delta [...]`` positions: rotate-half pairs (i, i + rd / 2)
    with angle delta * freq[i]; dims past rd = 2 * len(freq) unchanged."""
    h = freq.numel()
    angle = delta.to(torch.float64)[..., None] * freq.to(torch.float64)
    c, s = angle.cos(), angle.sin()
    x = x.to(torch.float64)
    lo, hi = x[..., :h], x[..., h:2 * h]
    return torch.cat([lo * c - hi * s, hi * c + lo * s, x[..., 2 * h:]], dim=-1)


def reference(qp, qg, keys, values, groups, window, scale, freq):
    """SelfExtend decode attention in float64: out [N, Hq, D], lse [N, Hq].

    Request n has S keys; the query sits at p = S - 1. Key j is stored at its grouped position j // G.
    Keys with p - j >= window are grouped: scored against qg (the query at p // G + w - w // G) as
    stored. The others are neighbours: rotated by j - j // G back to position j and scored against qp.
    G = 1 rows use qp throughout (plain attention)."""
    outs, lses = [], []
    for n, (k, v) in enumerate(zip(keys, values)):
        S, hkv, _ = k.shape
        hq = qp.shape[1]
        G = int(groups[n])
        p = S - 1
        j = torch.arange(S)
        k_neighbour = rotate64(k, (j - j // G)[:, None].expand(S, hkv), freq)
        grouped = p - j >= window
        q_grouped = qp[n] if G == 1 else qg[n]
        out_n, lse_n = [], []
        for head in range(hq):
            kv = head // (hq // hkv)
            s_grouped = k[:, kv].double() @ q_grouped[head].double()
            s_neighbour = k_neighbour[:, kv] @ qp[n, head].double()
            s = torch.where(grouped, s_grouped, s_neighbour) * scale
            lse = torch.logsumexp(s, 0)
            out_n.append(torch.exp(s - lse) @ v[:, kv].double())
            lse_n.append(lse)
        outs.append(torch.stack(out_n))
        lses.append(torch.stack(lse_n))
    return torch.stack(outs), torch.stack(lses)


def plain(q, keys, values, scale, dtype):
    """Ordinary attention of q [N, Hq, D] over all stored keys, in ``dtype``."""
    outs = []
    for n, (k, v) in enumerate(zip(keys, values)):
        r = q.shape[1] // k.shape[1]
        kk, vv = k.to(dtype).repeat_interleave(r, dim=1), v.to(dtype).repeat_interleave(r, dim=1)
        s = torch.einsum("hd,shd->hs", q[n].to(dtype), kk) * scale
        outs.append(torch.einsum("hs,shd->hd", torch.softmax(s, -1), vv))
    return torch.stack(outs)


# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    lens: tuple[int, ...]
    groups: tuple[int, ...]
    window: int
    hq: int = 9  # the bundled model: 9 query heads, 3 kv heads, head size 64
    hkv: int = 3
    d: int = 64
    rotary_dim: int | None = None  # default: d (full rotary)
    sharp: float = 1.0  # query scale: sharper softmax
    qg_in_kernel: bool = False
    seed: int = 0


CASES = {
    "mixed_groups": Case((2049, 700, 31, 1, 100, 101, 99, 3000), (1, 2, 4, 5, 4, 5, 2, 4), 100),
    "around_window": Case((63, 64, 65, 200), (4, 5, 2, 4), 64),  # S < w, S = w, S = w + 1
    "window_37": Case((37, 38, 36, 500), (2, 5, 4, 4), 37, seed=1),  # w not a multiple of any B
    "long_split": Case((5000,), (4,), 513, seed=2),  # one row cut in pieces, merged by log-sum-exp
    "partial_rotary": Case((900, 1500, 64), (4, 5, 2), 300, rotary_dim=32, sharp=4.0, seed=3),
    "d128_r4": Case((1000, 333), (5, 2), 129, hq=8, hkv=2, d=128, rotary_dim=64, seed=4),
    "qg_in_kernel": Case((2049, 333, 80, 10), (4, 5, 2, 1), 100, qg_in_kernel=True, seed=5),
    "d32_r2": Case((300, 129, 40), (4, 3, 2), 32, hq=4, hkv=2, d=32, seed=6),  # tests_vllm's tiny Llama
    "d256_r4": Case((700, 260), (3, 8), 128, hq=4, hkv=1, d=256, seed=7),  # Gemma 3 270M
    "r1": Case((800, 90), (3, 2), 64, hq=4, hkv=4, seed=8),
    "r8": Case((800, 90), (3, 1), 64, hq=16, hkv=2, d=128, qg_in_kernel=True, seed=9),
}
BIG = {"engine_sized": Case((12000, 8193, 4097, 2049), (3, 4, 6, 1), 2048, seed=10)}  # slow
GRID = kernel_grid(CASES, BIG)


@pytest.fixture(scope="module")
def kernel():
    return built_kernels()


def make(case: Case, block: int, dtype: torch.dtype, poison: bool = True):
    """Random stored keys / values (representable in dtype), queries, and the filled cache."""
    g = torch.Generator().manual_seed(case.seed)
    keys = [torch.randn(s, case.hkv, case.d, generator=g).to(dtype).float() for s in case.lens]
    values = [torch.randn(s, case.hkv, case.d, generator=g).to(dtype).float() for s in case.lens]
    n = len(case.lens)
    qp = (torch.randn(n, case.hq, case.d, generator=g) * case.sharp).to(dtype)
    qg = (torch.randn(n, case.hq, case.d, generator=g) * case.sharp).to(dtype)  # G = 1 rows: ignored
    return keys, values, qp, qg, PagedCache(keys, values, block, dtype, seed=case.seed, poison=poison)


def grouped_query(qp, case: Case, freq):
    """The query at p // G + w - w // G, from qp at p = S - 1, in float64 (what the kernel makes itself)."""
    rows = []
    for n, (S, G) in enumerate(zip(case.lens, case.groups)):
        p = S - 1
        shift = torch.tensor(float(p // G + case.window - case.window // G - p)).expand(case.hq)
        rows.append(rotate64(qp[n], shift, freq))
    return torch.stack(rows)


@pytest.mark.parametrize("name,block,dtype", GRID)
def test_kernel_matches_float64_reference(kernel, name, block, dtype):
    case = CASES.get(name) or BIG[name]
    keys, values, qp, qg, cache = make(case, block, dtype)
    freq = inv_freq(case.rotary_dim or case.d)
    scale = case.d ** -0.5
    groups = torch.tensor(case.groups, dtype=torch.int32)
    before = cache.checksum()
    table = RotationTable(freq, 8)  # deliberately short: decode grows it
    out, lse = kernel.decode(qp, cache.key_cache, cache.value_cache, cache.block_table, cache.seq_lens, groups,
                             case.window, scale, table, query_grouped=None if case.qg_in_kernel else qg)
    assert cache.checksum() == before, "the kernel changed the cache"
    qg64 = grouped_query(qp, case, freq) if case.qg_in_kernel else qg
    ref, ref_lse = reference(qp, qg64, keys, values, case.groups, case.window, scale, freq)
    err = (out.double() - ref).abs().max().item()
    plain64 = plain(qp, keys, values, scale, torch.float64)
    if dtype == torch.float32:
        baseline = (plain(qp, keys, values, scale, torch.float32).double() - plain64).abs().max().item()
    else:  # vLLM's own bfloat16 kernel on a cache without NaNs (it reads unused slots of a block)
        clean = PagedCache(keys, values, block, dtype, seed=case.seed)
        baseline = (clean.stock(qp, scale).double() - plain64).abs().max().item()
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (len(case.lens), case.hq)
    assert err <= 2 * baseline + 1e-6, f"kernel error {err:.3e}, plain attention's {baseline:.3e}"
    lse_err = (lse.double() - ref_lse).abs().max().item()
    assert lse_err <= 1e-5 * max(1.0, ref_lse.abs().max().item()), f"log-sum-exp off by {lse_err:.3e}"


def test_comparison_can_fail(kernel):
    """The check above tells a right answer from a window off by one or another G (the kernel agrees
    only with the right reference); it would catch a key at a wrong position."""
    case = Case((700, 300, 2049), (4, 5, 2), 100, seed=11)
    keys, values, qp, qg, cache = make(case, 32, torch.float32)
    freq, scale = inv_freq(64), 64 ** -0.5
    out, _ = kernel.decode(qp, cache.key_cache, cache.value_cache, cache.block_table, cache.seq_lens,
                           torch.tensor(case.groups, dtype=torch.int32), case.window, scale,
                           RotationTable(freq, 4096), query_grouped=qg)
    errors = {}
    for what, (window, groups) in {"right": (100, case.groups), "w+1": (101, case.groups), "w-1": (99, case.groups),
                                   "G+1": (100, [g + 1 for g in case.groups])}.items():
        ref, _ = reference(qp, qg, keys, values, groups, window, scale, freq)
        errors[what] = (out.double() - ref).abs().max().item()
    assert errors["right"] < 1e-5, errors
    assert min(errors["w+1"], errors["w-1"], errors["G+1"]) > 1e-3, errors


def relative_distance(i: int, j: int, window: int, group: int) -> int:
    """The distance SelfExtend lets query i see key j at (the paper, Section 3)."""
    return i - j if i - j < window else (i // group + window - window // group) - j // group


@pytest.mark.parametrize("S,G,window", [(300, 5, 100), (64, 4, 64), (97, 3, 10)])
def test_stored_form_is_selfextend(S, G, window):
    """The reference's form (stored keys at j // G; grouped keys against qg, neighbour keys rotated
    back by j - j // G against qp) gives every score of SelfExtend's definition by distances."""
    g = torch.Generator().manual_seed(S)
    freq = inv_freq(64).double()
    q_raw, k_raw = torch.randn(64, generator=g, dtype=torch.float64), torch.randn(S, 64, generator=g, dtype=torch.float64)
    p, j = S - 1, torch.arange(S)
    by_distance = torch.stack([rotate64(q_raw, torch.tensor(float(relative_distance(p, int(t), window, G))), freq)
                               @ k_raw[t] for t in j])  # RoPE score depends only on the distance
    stored = rotate64(k_raw, j // G, freq)
    qp = rotate64(q_raw, torch.tensor(float(p)), freq)
    qg = rotate64(q_raw, torch.tensor(float(p // G + window - window // G)), freq)
    stored_form = torch.where(p - j >= window, stored @ qg, rotate64(stored, j - j // G, freq) @ qp)
    torch.testing.assert_close(stored_form, by_distance, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# the call: out rows, strided queries, empty rows, bad input
# ------------------------------------------------------------------------------------------------


def test_writes_into_strided_out_rows_from_strided_queries(kernel):
    """``out`` may be rows of a bigger tensor (vLLM's output) and the queries a view of a fused qkv
    tensor: the result lands in those rows only, equal to a call with fresh contiguous tensors."""
    case = Case((500, 90, 3), (4, 1, 2), 64, seed=12)
    keys, values, qp, qg, cache = make(case, 16, torch.float32)
    table = RotationTable(inv_freq(64), 600)
    groups = torch.tensor(case.groups, dtype=torch.int32)
    args = (cache.key_cache, cache.value_cache, cache.block_table, cache.seq_lens, groups, case.window, 0.125, table)
    want, want_lse = kernel.decode(qp, *args)
    n, hq, d = qp.shape
    qkv = torch.randn(n, hq * d + 2 * 3 * d)
    qkv[:, : hq * d] = qp.reshape(n, hq * d)
    query = qkv[:, : hq * d].view(n, hq, d)  # row stride hq * d + 6 d
    rows = torch.full((n + 2, hq, d + 8), 7.0)
    out = rows[1: n + 1, :, :d]  # strides ((d + 8) hq, d + 8, 1)
    got, lse = kernel.decode(query, *args, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(rows[1: n + 1, :, :d], want) and torch.equal(lse, want_lse)
    assert (rows[0] == 7).all() and (rows[n + 1] == 7).all() and (rows[..., d:] == 7).all()


def test_row_without_keys_is_zero_with_lse_minus_infinity(kernel):
    keys = [torch.randn(s, 3, 64) for s in (40, 1)]
    cache = PagedCache(keys, keys, 16, torch.float32, poison=True)
    seq_lens = torch.tensor([40, 0], dtype=torch.int32)  # the second request has no key yet
    q = torch.randn(2, 9, 64)
    out, lse = kernel.decode(q, cache.key_cache, cache.value_cache, cache.block_table, seq_lens, 4, 16, 0.125,
                             RotationTable(inv_freq(64), 64))
    assert (out[1] == 0).all() and torch.isinf(lse[1]).all() and (lse[1] < 0).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(lse[0]).all()


@pytest.mark.parametrize("change,message", [
    (dict(seq_lens=torch.tensor([40], dtype=torch.int64)), "must be int32"),
    (dict(block_table=torch.tensor([[0, 10_000, 1]], dtype=torch.int32)), "is not a block of the cache"),
    (dict(seq_lens=torch.tensor([4000], dtype=torch.int32)), "fit its block table"),
    (dict(group_size=0), "group_size\\[0\\] must be >= 1"),
    (dict(window=0), "window must be >= 1"),
    (dict(out=torch.empty(1, 9, 64, dtype=torch.bfloat16)), "out must be"),
    (dict(query_plain=torch.randn(1, 9, 64).to(torch.bfloat16)), "dtypes differ"),
    (dict(query_plain=torch.randn(1, 10, 64)), "multiple of kv heads"),
])
def test_bad_input_is_refused_with_a_clear_message(kernel, change, message):
    keys = [torch.randn(40, 3, 64)]
    cache = PagedCache(keys, keys, 16, torch.float32)
    args = dict(query_plain=torch.randn(1, 9, 64), key_cache=cache.key_cache, value_cache=cache.value_cache,
                block_table=cache.block_table, seq_lens=cache.seq_lens, group_size=4, window=16, scale=0.125,
                table=RotationTable(inv_freq(64), 64))
    before = cache.checksum()
    with pytest.raises(RuntimeError, match=message):
        kernel.decode(**{**args, **change})
    assert cache.checksum() == before


def test_unsupported_geometry_is_named():
    ok = dict(dtype=torch.float32, head_size=64, num_heads=9, num_kv_heads=3, block_size=128, isa="vec")
    assert cpu_kernel.unsupported(**ok) is None
    assert cpu_kernel.unsupported(**{**ok, "dtype": torch.bfloat16, "block_size": 16, "isa": "vec16"}) is None
    for change, word in [({"dtype": torch.float16}, "dtype"), ({"head_size": 80}, "head size"),
                         ({"num_heads": 27}, "query heads"), ({"num_heads": 10}, "query heads"),
                         ({"block_size": 24}, "block size"), ({"isa": "amx"}, "amx")]:
        assert word in cpu_kernel.unsupported(**{**ok, **change}), change


# ------------------------------------------------------------------------------------------------
# availability, the switch, the build cache
# ------------------------------------------------------------------------------------------------


def cpu_has_avx512f() -> bool:
    try:
        return any(line.startswith("flags") and "avx512f" in line.split()
                   for line in Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return False


def test_kernel_is_available_on_a_cpu_with_avx512f(monkeypatch):
    """So a broken build cannot hide behind the skips above."""
    if not cpu_has_avx512f():
        pytest.skip("this CPU lacks AVX-512F: vLLM attention runs in torch")
    monkeypatch.delenv(cpu_kernel.ENV, raising=False)
    assert cpu_kernel.available(), cpu_kernel.reason()
    assert cpu_kernel.reason() == ""


def test_environment_forces_the_torch_path(monkeypatch):
    monkeypatch.setenv(cpu_kernel.ENV, "torch")
    assert not cpu_kernel.available()
    assert "SELFEXTEND_VLLM_KERNEL=torch" in cpu_kernel.reason()
    monkeypatch.setenv(cpu_kernel.ENV, "tourch")
    with pytest.raises(ValueError, match="SELFEXTEND_VLLM_KERNEL='tourch' is not understood"):
        cpu_kernel.available()


class FakeBuild:
    """Stands in for torch's ``cpp_extension.load``: writes ``<name>.so`` (or fails) and counts calls."""

    def __init__(self, fail: bool = False):
        self.fail, self.calls = fail, 0

    def __call__(self, name, sources, extra_cflags, extra_ldflags, build_directory, verbose):
        self.calls += 1
        if self.fail:
            raise RuntimeError(f"Error building extension '{name}': decode.cpp:1:1: error: boom")
        (Path(build_directory) / f"{name}.so").write_text("built")
        return f"module built in {build_directory}"


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty kernel cache and a process that has not loaded the kernel."""
    monkeypatch.setenv("SELFEXTEND_CACHE", str(tmp_path))
    monkeypatch.delenv(cpu_kernel.ENV, raising=False)
    monkeypatch.setattr(cpu_kernel, "_state", cpu_kernel._State())
    monkeypatch.setattr(cpu_kernel, "_import", lambda name, library: f"imported {library}")
    if not cpu_has_avx512f():
        pytest.skip("this CPU lacks AVX-512F: the loader stops before building")
    return tmp_path / "vllm-kernel"


def test_failed_build_is_remembered_until_forced(fresh, monkeypatch):
    from torch.utils import cpp_extension

    failing = FakeBuild(fail=True)
    monkeypatch.setattr(cpp_extension, "load", failing)
    assert not cpu_kernel.available()
    assert "error: boom" in cpu_kernel.reason()
    [marker] = fresh.glob("*.failed")
    monkeypatch.setattr(cpu_kernel, "_state", cpu_kernel._State())  # a new process
    assert not cpu_kernel.available() and "failed before" in cpu_kernel.reason()
    assert failing.calls == 1
    monkeypatch.setattr(cpp_extension, "load", FakeBuild())
    assert cpu_kernel.build(force=True) is not None
    assert cpu_kernel.available() and not marker.exists()
    assert [p.name for p in fresh.iterdir()] == [marker.name.removesuffix(".failed")]  # no scratch left


def test_build_that_loses_the_race_keeps_the_winner(fresh, monkeypatch):
    """Two processes build at once: each in its own scratch folder; the second rename finds the first's
    folder in place, keeps it and removes its own scratch."""
    from torch.utils import cpp_extension

    build = FakeBuild()
    monkeypatch.setattr(cpp_extension, "load", build)
    name, key = "selfextend_decode_x", "decode-x"
    fresh.mkdir(parents=True)
    (fresh / key).mkdir()
    (fresh / key / f"{name}.so").write_text("the winner's")
    module = cpu_kernel._compile(name, fresh, fresh / key)
    assert module.startswith("module built in") and build.calls == 1
    assert (fresh / key / f"{name}.so").read_text() == "the winner's"
    assert [p.name for p in fresh.iterdir()] == [key]


def test_cache_key_follows_source_flags_and_cpu(monkeypatch):
    key = cpu_kernel._key("cpu", {"avx512f"})
    assert cpu_kernel._key("cpu", {"avx512f"}) == key
    assert cpu_kernel._key("other cpu", {"avx512f"}) != key
    assert cpu_kernel._key("cpu", {"avx512f", "amx_tile"}) != key
    monkeypatch.setattr(cpu_kernel, "CFLAGS", ("-O2",))
    assert cpu_kernel._key("cpu", {"avx512f"}) != key


def test_cache_key_follows_every_source_and_header(monkeypatch, tmp_path):
    """A change of any file the extension is built from builds it afresh."""
    key = cpu_kernel._key("cpu", {"avx512f"})
    for name in ("SOURCES", "HEADERS"):
        for path in getattr(cpu_kernel, name):
            changed = tmp_path / path.name
            changed.write_bytes(path.read_bytes() + b"\n// changed\n")
            with monkeypatch.context() as patch:
                patch.setattr(cpu_kernel, name, tuple(changed if p == path else p for p in getattr(cpu_kernel, name)))
                assert cpu_kernel._key("cpu", {"avx512f"}) != key, path.name


def test_sources_ship_with_the_package():
    """The loader compiles csrc/ on the user's machine: a wheel must carry every source and header."""
    import fnmatch
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = cpu_kernel.SOURCES + cpu_kernel.HEADERS
    assert {path.name for path in shipped} == {path.name for path in cpu_kernel.CSRC.iterdir()}
    for path in shipped:
        relative = path.relative_to(ROOT / "src" / "selfextend" / "vllm").as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in data["selfextend.vllm"]), relative


@pytest.mark.slow
def test_two_processes_build_at_once(tmp_path):
    """Two real builds into one empty cache at the same time: both load a kernel, one folder remains."""
    env = {**os.environ, "SELFEXTEND_CACHE": str(tmp_path)}
    env.pop(cpu_kernel.ENV, None)
    command = [sys.executable, "-m", "selfextend.vllm.cpu_kernel"]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    folders = sorted(p.name for p in (tmp_path / "vllm-kernel").iterdir())
    assert len(folders) == 1 and folders[0].startswith("kernel-"), folders
