"""Prefill of one attention layer: the SelfExtend prefill kernel against vLLM's stock CPU kernel.

Both read the same vLLM CPU paged cache (filled by vLLM's own writer, tests_vllm/cpu_cache.py) for
the bundled model's geometry (9 query heads, 3 KV heads, head size 64). A workload is R requests,
each with n new queries over S cached keys (n = S: whole prompts; n < S: a chunk after cached
tokens). Variants, interleaved within every repetition in a rotating order so that a change of
machine load hits them alike:

    stock     vLLM's cpu_attention_with_kv_cache (plain causal attention; its scheduler metadata
              made once, as vLLM does once per step for all layers)
    G=1       our prefill kernel, every request plain (group size 1)
    G=g       our prefill kernel, every request grouped with G = g (window w): SelfExtend
    torch     SelfExtend the way it ran before the kernel: each request's keys gathered out of the
              cache and the library's kernel (paged.attend_request); --torch-reps repetitions only

Several copies of the cache ("layers") are cycled so that a call does not find the previous call's
keys hot in cache (each workload's copies total >= 160 MB). Reported: median milliseconds per call
and the median over repetitions of (stock / variant) of the same repetition (above 1: faster than
vLLM's kernel doing plain attention).

    OMP_NUM_THREADS=2 .venv-vllm/bin/python scripts/bench_prefill_kernel.py --out results/vllm/prefill_kernel.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests_vllm"))
from cpu_cache import cold_copies  # noqa: E402  (vLLM's writer fills the cache, as in the tests)

from selfextend.settings import Settings  # noqa: E402
from selfextend.vllm import cpu_kernel  # noqa: E402
from selfextend.vllm.cpu_backend import probe_layout  # noqa: E402
from selfextend.vllm.paged import attend_request  # noqa: E402
from selfextend.vllm.rotations import RotationTable  # noqa: E402

HQ, HKV, D = 9, 3, 64  # SmolLM2-135M
DEFAULT_WORKLOADS = "1x4096/4096:2:2048,1x4096/8192:2:2048,1x4096/12000:2:2048,8x1500/1500:2:512"


def inv_freq(rotary_dim: int, base: float = 100000.0) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)


def parse(spec: str) -> tuple[int, int, int, int, int]:
    """"R x n / S : G : w" -> (R, n, S, G, w)."""
    shape, g, w = spec.split(":")
    requests, rest = shape.split("x")
    n, s = rest.split("/")
    return int(requests), int(n), int(s), int(g), int(w)


def workload(spec: str, args, dtype: torch.dtype) -> dict:
    """Median ms per variant and median per-repetition ratios stock / variant."""
    n_req, n, seq, groups, window = parse(spec)
    scale = D ** -0.5
    g = torch.Generator().manual_seed(0)
    caches = cold_copies(n_req, seq, HKV, D, args.block, dtype, g)
    starts = torch.arange(0, n_req * n + 1, n, dtype=torch.int32)
    metadata = caches[0].metadata(HQ, dtype, starts)
    q = torch.randn(n_req * n, HQ, D, generator=g).to(dtype)
    out = torch.empty_like(q)
    table = RotationTable(inv_freq(D), max(seq, window))
    ones = torch.ones(n_req, dtype=torch.int32)
    grouped = torch.full((n_req,), groups, dtype=torch.int32)
    layout = probe_layout(caches[0].isa, args.block, HKV, D, dtype, "auto")
    settings = Settings(pretrained_length=window * 4, window=window, group_size=groups)

    def ours(cache, g):
        return lambda: cpu_kernel.prefill(q, cache.key_cache, cache.value_cache, starts, cache.seq_lens,
                                          cache.block_table, g, window, scale, table, out=out)

    def gathered(cache):
        def run():
            for r in range(n_req):
                blocks = cache.block_table[r, : -(-seq // args.block)].long()
                k, v = layout.gather(cache.key_cache, cache.value_cache, blocks, seq)
                out[r * n: (r + 1) * n] = attend_request(q[r * n: (r + 1) * n], k, v, settings, table, scale)
        return run

    variants = {
        "stock": lambda cache: (lambda: cache.stock(q, scale, metadata, starts)),
        "G=1": lambda cache: ours(cache, ones),
        f"G={groups}": lambda cache: ours(cache, grouped),
    }
    if args.torch_reps:
        variants["torch"] = gathered
    names = list(variants)
    for name in names:  # warm-up
        variants[name](caches[0])()
    times = {name: [] for name in names}
    at = 0
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            if name == "torch" and len(times["torch"]) >= args.torch_reps:
                continue
            call = variants[name](caches[at % len(caches)])
            at += 1
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    ratio = {name: statistics.median(a / b for a, b in zip(times["stock"], times[name])) for name in names}
    return {"ms": ms, "ratio": ratio, "copies": len(caches), "isa": caches[0].isa, "groups": groups}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default=DEFAULT_WORKLOADS,
                        help="comma-separated 'R x n / S : G : w' (requests x new queries / keys : G : window)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--block", type=int, default=128, help="KV cache block size")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--torch-reps", type=int, default=3, help="repetitions of the torch variant (0: skip it)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the table (with the command and machine) here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu_kernel.available():
        sys.exit(f"the CPU kernels are unavailable: {cpu_kernel.reason()}")
    load_before = os.getloadavg()
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for spec in args.workloads.split(","):
            result = workload(spec, args, dtype)
            n_req, n, seq, groups, window = parse(spec)
            cells = [f"{result['ms']['stock']:.1f}"]
            cells += [f"{result['ms'][k]:.1f} ({result['ratio'][k]:.2f}x)" for k in ("G=1", f"G={groups}")]
            if "torch" in result["ms"]:
                cells.append(f"{result['ms']['torch']:.0f} ({result['ratio']['torch']:.2f}x)")
            rows.append(f"| {dtype_name} | {n_req} x {n} over {seq} | {groups} | {window} | {result['isa']} | "
                        + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    load_after = os.getloadavg()
    columns = ["dtype", "requests x queries over keys", "G", "w", "vLLM ISA", "stock ms",
               "G=1 ms (stock / ours)", "G ms (stock / ours)"] + (["torch ms (stock / torch)"] if args.torch_reps else [])
    table = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n" + "\n".join(rows)
    print(table)
    if args.out:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
        command = " ".join(["OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?"),
                            ".venv-vllm/bin/python", "scripts/bench_prefill_kernel.py", *sys.argv[1:]])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            "# SelfExtend prefill kernel vs vLLM's stock CPU kernel, one layer, one prefill step\n\n"
            f"    {command}\n\n"
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu}; torch {torch.__version__}, "
            f"{args.threads} threads; load average (1/5/15 min) {'/'.join(f'{x:.2f}' for x in load_before)} "
            f"before, {'/'.join(f'{x:.2f}' for x in load_after)} after (2 cores, shared machine).\n\n"
            f"Geometry of SmolLM2-135M (9 query heads, 3 KV heads, head size 64), block size {args.block}, "
            f"{args.reps} interleaved repetitions ({args.torch_reps} for torch). Milliseconds are medians per call; "
            "ratios are the median over repetitions of (stock / variant) within the same repetition (above 1: "
            "faster than vLLM's kernel doing plain causal attention). `G=1` is our kernel doing plain attention; "
            "`G` is SelfExtend with that group size and window w; `torch` is SelfExtend as it ran before this "
            "kernel (keys gathered out of the cache, the library's torch kernel). Stock is "
            "`cpu_attention_with_kv_cache` alone (no cache write).\n\n"
            + table + "\n")


if __name__ == "__main__":
    main()
