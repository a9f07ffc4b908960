"""torch.profiler table of one layer's attention: plain SDPA against SelfExtend's kernel.

Shapes of the bundled SmolLM2-135M (9 query heads, 3 KV heads, head dim 64), random q/k/v, G = 4,
w = 1024, trained length 8192, the default block (about 4096 rows, a multiple of w - 1).

    .venv/bin/python scripts/profile_kernel.py N DTYPE [THREADS]     e.g. 8192 bfloat16 1
"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from selfextend.attention import Row, selfextend_row
from selfextend.rope import Rotary
from selfextend.schedule import Schedule
from selfextend.sequence import RowKeys
from selfextend.settings import Settings

n, dtype_name = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
dtype = getattr(torch, dtype_name)
torch.manual_seed(0)
hq, hkv, d, w = 9, 3, 64, 1024
q, k, v = (torch.randn(h, n, d).to(dtype) for h in (hq, hkv, hkv))  # [H, n, d]
rotary = Rotary(1.0 / (100000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)))
settings = Settings(8192, w, 4)
row = Row(q, k, v, 0, 0, d**-0.5)


def plain():
    return torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, enable_gqa=True)


def selfextend():
    return selfextend_row(row, Schedule(settings), rotary, RowKeys.for_row(row, settings, rotary))


seconds = {"plain": [], "selfextend": []}
for _ in range(3):
    for name, f in (("plain", plain), ("selfextend", selfextend)):
        t0 = time.perf_counter()
        f()
        seconds[name].append(time.perf_counter() - t0)
p, s = min(seconds["plain"]), min(seconds["selfextend"])
print(f"n={n} {dtype_name} G=4 w=1024, {torch.get_num_threads()} thread(s): plain SDPA {p:.3f} s, "
      f"selfextend_row {s:.3f} s, ratio {s / p:.2f}")
for name, f in (("plain", plain), ("selfextend", selfextend)):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        f()
    print(f"--- {name}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=55))
