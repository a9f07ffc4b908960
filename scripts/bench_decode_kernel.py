"""One decode step of one attention layer: the SelfExtend decode kernel against vLLM's stock CPU kernel.

Both read the same vLLM CPU paged cache (filled by vLLM's own writer, tests_vllm/cpu_cache.py) for
the bundled model's geometry (9 query heads, 3 KV heads, head size 64). Variants, interleaved within
every repetition in a rotating order so that a change of machine load hits them alike:

    stock        vLLM's cpu_attention_with_kv_cache (plain attention; its scheduler metadata made once,
                 as vLLM does once per step for all layers)
    G=1          our kernel, every request plain (group size 1)
    G=g          our kernel, every request grouped with G = g (window w), grouped query given
    G=g, qg in   the same with the grouped query rotated inside the kernel
    G=g, prefill the prefill kernel (cpu_kernel.prefill) on the same decode step: what folding decode
                 into it would cost

Several copies of the cache ("layers") are cycled so that a call does not find the previous call's
keys hot in cache (each workload's copies total >= 160 MB). Reported: median milliseconds per call,
the median over repetitions of (variant / stock) of the same repetition, and the ratio of the fastest
calls (min / min: the cost undisturbed by other processes, telling on a shared machine).

    OMP_NUM_THREADS=2 .venv-vllm/bin/python scripts/bench_decode_kernel.py --out results/vllm/decode_kernel.md

``--clock cpu`` times the CPU seconds of the whole process instead of wall seconds (run it with
``OMP_WAIT_POLICY=PASSIVE`` so idle threads do not spin): on a loaded machine, a parallel call's wall
time waits for whichever of its threads was descheduled, its CPU time does not.
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

from selfextend.vllm import cpu_kernel  # noqa: E402
from selfextend.vllm.rotations import RotationTable  # noqa: E402

HQ, HKV, D = 9, 3, 64  # SmolLM2-135M


def inv_freq(rotary_dim: int, base: float = 100000.0) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)


def workload(n_req: int, seq: int, args, dtype: torch.dtype) -> dict:
    """Median ms per variant and median per-repetition ratios to stock."""
    scale = D ** -0.5
    g = torch.Generator().manual_seed(0)
    caches = cold_copies(n_req, seq, HKV, D, args.block, dtype, g)
    metadata = caches[0].metadata(HQ, dtype)
    q = torch.randn(n_req, HQ, D, generator=g).to(dtype)
    qg = torch.randn(n_req, HQ, D, generator=g).to(dtype)
    out = torch.empty_like(q)
    table = RotationTable(inv_freq(D), max(seq, args.window))
    ones = torch.ones(n_req, dtype=torch.int32)
    grouped = torch.full((n_req,), args.groups, dtype=torch.int32)

    def ours(cache, groups, query_grouped):
        return lambda: cpu_kernel.decode(q, cache.key_cache, cache.value_cache, cache.block_table, cache.seq_lens,
                                            groups, args.window, scale, table, query_grouped=query_grouped, out=out)

    starts = torch.arange(n_req + 1, dtype=torch.int32)

    def prefill(cache, groups):
        return lambda: cpu_kernel.prefill(q, cache.key_cache, cache.value_cache, starts, cache.seq_lens,
                                          cache.block_table, groups, args.window, scale, table, out=out)

    variants = {
        "stock": lambda cache: (lambda: cache.stock(q, scale, metadata)),
        "G=1": lambda cache: ours(cache, ones, None),
        f"G={args.groups}": lambda cache: ours(cache, grouped, qg),
        f"G={args.groups}, qg in": lambda cache: ours(cache, grouped, None),
        f"G={args.groups}, prefill": lambda cache: prefill(cache, grouped),
    }
    names = list(variants)
    for name in names:  # warm-up: every copy once
        for cache in caches:
            variants[name](cache)()
    times = {name: [] for name in names}
    at = 0
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            call = variants[name](caches[at % len(caches)])
            at += 1
            started = args.clock()
            call()
            times[name].append(args.clock() - started)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    ratio = {name: statistics.median(a / b for a, b in zip(times[name], times["stock"])) for name in names}
    ratio_min = {name: min(times[name]) / min(times["stock"]) for name in names}
    return {"ms": ms, "ratio": ratio, "ratio_min": ratio_min, "copies": len(caches), "isa": caches[0].isa}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="8x2049,8x8193,2x12000,16x3000", help="requests x keys, comma-separated")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--block", type=int, default=128, help="KV cache block size")
    parser.add_argument("--groups", type=int, default=3, help="G of the grouped variants")
    parser.add_argument("--window", type=int, default=2048, help="w: neighbour keys per request")
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--threads", default="2", help="torch threads, comma-separated (e.g. 1,2)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--out", type=Path, help="also write the table (with the command and machine) here")
    parser.add_argument("--append", action="store_true", help="add to --out instead of replacing it")
    args = parser.parse_args()
    clock_name, args.clock = args.clock, time.perf_counter if args.clock == "wall" else time.process_time
    if not cpu_kernel.available():
        sys.exit(f"the CPU kernels are unavailable: {cpu_kernel.reason()}")
    load_before = os.getloadavg()
    rows = []
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            for spec in args.workloads.split(","):
                n_req, seq = map(int, spec.split("x"))
                result = workload(n_req, seq, args, dtype)
                names = list(result["ms"])
                cells = [f"{result['ms']['stock']:.2f}"]
                cells += [f"{result['ms'][k]:.2f} ({result['ratio'][k]:.2f}x; min {result['ratio_min'][k]:.2f}x)"
                          for k in names[1:]]
                rows.append(f"| {threads} | {dtype_name} | {n_req} x {seq} | {result['isa']} | " + " | ".join(cells) + " |")
                print(rows[-1], flush=True)
    load_after = os.getloadavg()
    header = ("| threads | dtype | requests x keys | vLLM ISA | stock ms | "
              + " | ".join(f"{k}: ms (ratio; min ratio)" for k in names[1:]) + " |\n|" + "---|" * (5 + len(names) - 1))
    table = header + "\n" + "\n".join(rows)
    print(table)
    if args.out:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
        env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ]
        command = " ".join([*env, ".venv-vllm/bin/python", "scripts/bench_decode_kernel.py", *sys.argv[1:]])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        title = "# SelfExtend decode kernel vs vLLM's stock CPU kernel, one layer, one decode step\n\n"
        before = args.out.read_text() + "\n" if args.append and args.out.exists() else title
        args.out.write_text(
            before + f"## {clock_name} clock, threads {args.threads}\n\n"
            f"    {command}\n\n"
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu}; torch {torch.__version__}, "
            f"threads {args.threads}; load average (1/5/15 min) {'/'.join(f'{x:.2f}' for x in load_before)} "
            f"before, {'/'.join(f'{x:.2f}' for x in load_after)} after (2 cores, shared machine).\n\n"
            f"Geometry of SmolLM2-135M (9 query heads, 3 KV heads, head size 64), block size {args.block}, "
            f"window w = {args.window}, {args.reps} interleaved repetitions. Milliseconds ({clock_name} clock) are "
            "medians per call; "
            "ratios are the median over repetitions of (variant / stock) within the same repetition (below 1: "
            "faster than vLLM's kernel doing plain attention); min ratios compare the fastest calls. `G=1` is our kernel doing plain attention; "
            f"`G={args.groups}` grouped attention with the grouped query given; `qg in` with the grouped query "
            "rotated inside the kernel; `prefill` the prefill kernel (cpu_kernel.prefill) on the same step. Stock is "
            "`cpu_attention_with_kv_cache` alone (no cache write).\n\n"
            + table + "\n")


if __name__ == "__main__":
    main()
