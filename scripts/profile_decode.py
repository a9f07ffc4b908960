"""torch.profiler tables of decode steps on the bundled model: plain against SelfExtend (G = 4, w = 1024).

Prefills N random tokens into a DynamicCache, runs one warm-up step, then profiles 8 decode steps.

    .venv/bin/python scripts/profile_decode.py N DTYPE      e.g. 8192 float32
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

import selfextend
from selfextend.assets import load_model

n, dtype_name = int(sys.argv[1]), sys.argv[2]
steps = 8
torch.set_num_threads(2)
model, _ = load_model("smollm2-135m", dtype=getattr(torch, dtype_name))
ids = torch.randint(100, 40000, (1, n + steps + 1), generator=torch.Generator().manual_seed(0))  # [1, n + 9]


def profile_steps(name: str) -> None:
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :n], cache=cache, logits_to_keep=1)
        model(ids[:, n : n + 1], cache=cache, logits_to_keep=1)  # warm-up step
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(n + 1, n + 1 + steps):
                model(ids[:, i : i + 1], cache=cache, logits_to_keep=1)
    print(f"### {name}, {dtype_name}: {steps} decode steps at {n} tokens of context")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=55))


profile_steps("plain")
with selfextend.enable(model, group_size=4, window=1024):
    profile_steps("selfextend G=4 w=1024")
