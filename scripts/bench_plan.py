"""What SelfExtend adds to an engine step's metadata in vLLM (CPU): the step plan (``plan.build_plan``)
and the stock kernel's scheduler metadata for the plain sub-batch, the work ``SelfExtendCPUMetadataBuilder
.build`` does on top of vLLM's own ``build`` once per step for all layers. Steps where no row groups
add nothing (the builder returns vLLM's metadata untouched) and are not timed.

    OMP_NUM_THREADS=2 .venv-vllm/bin/python scripts/bench_plan.py --out results/vllm/plan.md

Steps of 16 requests (the geometry of SmolLM2-135M, block size 128): half of them plain, half grouped,
all decoding; the same with one grouped request prefilling a 2048-token chunk; all 16 grouped and
decoding. Reported: the median over repetitions of the milliseconds per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from selfextend.vllm.plan import build_plan

HQ, HKV, D, BLOCK = 9, 3, 64, 128


def step(groups: list[int], queries: list[int], contexts: list[int]):
    """vLLM's batch metadata of one step: groups [R], query_start_loc [R + 1], seq_lens [R], block table."""
    starts = torch.tensor([0] + queries).cumsum(0).to(torch.int32)
    lens = torch.tensor(contexts, dtype=torch.int32)
    blocks = -(-max(contexts) // BLOCK)
    table = torch.randperm(len(contexts) * blocks, dtype=torch.int32).view(len(contexts), blocks)
    return torch.tensor(groups, dtype=torch.int32), starts, lens, table, int(starts[-1])


def extra_work(groups, starts, lens, table, num_tokens, isa):
    """What the SelfExtend builder computes beyond vLLM's own metadata for one step."""
    plan = build_plan(groups, starts, lens, table, num_tokens)
    if plan.plain is not None:
        meta = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=plan.plain.seq_lens.numel(), num_heads=HQ, num_kv_heads=HKV, head_dim=D,
            seq_lens=plan.plain.seq_lens, dtype=torch.float32, query_start_loc=plan.plain.query_start_loc,
            causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=False, kv_cache_dtype="auto")
        plan = dataclasses.replace(plan, plain=dataclasses.replace(plan.plain, kernel_metadata=meta))
    return plan


WORKLOADS = {
    "16 decoding (8 plain, 8 grouped G=3)": ([1] * 8 + [3] * 8, [1] * 16, [1500] * 8 + [12000] * 8),
    "16 (8 plain, 7 grouped decoding, 1 grouped 2048-token chunk)":
        ([1] * 8 + [3] * 8, [1] * 15 + [2048], [1500] * 8 + [12000] * 7 + [10000]),
    "16 decoding, all grouped (G=2..5)": ([2, 3, 4, 5] * 4, [1] * 16, [10000, 16000, 24000, 30000] * 4),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    isa = _get_attn_isa(torch.float32, BLOCK, D)
    rows = []
    for name, (groups, queries, contexts) in WORKLOADS.items():
        batch = step(groups, queries, contexts)
        for _ in range(10):
            extra_work(*batch, isa)
        times = []
        for _ in range(args.reps):
            started = time.perf_counter()
            extra_work(*batch, isa)
            times.append(time.perf_counter() - started)
        rows.append(f"| {name} | {statistics.median(times) * 1e3:.3f} | {min(times) * 1e3:.3f} |")
        print(rows[-1], flush=True)
    table = "| step | median ms | fastest ms |\n|---|---:|---:|\n" + "\n".join(rows)
    if args.out:
        command = " ".join([f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')}", ".venv-vllm/bin/python",
                            "scripts/bench_plan.py", *sys.argv[1:]])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            "# The SelfExtend step plan in vLLM (CPU): its cost per engine step\n\n"
            f"    {command}\n\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
            f"{args.reps} repetitions; load average before {os.getloadavg()[0]:.2f}.\n\n"
            "Time of `plan.build_plan` plus the stock scheduler metadata of the plain sub-batch: what "
            "`SelfExtendCPUMetadataBuilder.build` adds to vLLM's own `build`, once per step for all layers "
            "(a step where no row groups adds nothing). Target: under 2 ms per step for 16 requests.\n\n"
            + table + "\n")


if __name__ == "__main__":
    main()
