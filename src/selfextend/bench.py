"""`selfextend bench`: time and memory of SelfExtend against plain attention, same run, same inputs.

Every (method, length) cell runs in its own subprocess, so peak memory is that cell's own: the
resident set is sampled every 5 ms during the prefill and reported as the increase over the
resident set just before it. Methods:

    plain       the model's own attention (SDPA)
    selfextend  this library with -G/-w/--mode (default: automatic G, w = L // 4); several settings
                in one run as ``selfextend:G:w`` (``-`` for a default), also ``rerope``, ``leaky:-:w``
    naive       the official implementation's merge with the settings of ``selfextend``: two full
                L x L score matrices per head, ``torch.where`` by distance, one softmax -- O(L^2)
                memory, run only where it fits

Prints a table, writes ``bench.json``, ``bench.md`` and ``bench.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

from .commands.common import add_model_argument, add_selfextend_arguments, bad_input, positive_int, positive_ints
from .evaluation.methods import Method, parse_method

METHODS = ("plain", "selfextend", "rerope", "leaky", "naive")  # method names --methods takes
DEFAULT_METHODS = "plain,selfextend,naive"
NAIVE_MEMORY_LIMIT = 12e9  # bytes of score matrices the naive merge may allocate before we skip it


# ------------------------------------------------------------------------------------------------
# the official implementation's merge, as an attention function (benchmark reference only)
# ------------------------------------------------------------------------------------------------
def naive_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Two full ``[B, H, L, L]`` score matrices (neighbor and grouped), merged by distance."""
    import torch

    from .integration import _LAYERS
    from .positions import grouped_positions
    from .rope import rotate, rotation

    handle, inv_freq = _LAYERS[module]
    s = handle.settings
    b, hq, lq, d = query.shape
    lk = key.shape[2]
    r = hq // key.shape[1]
    k = key.repeat_interleave(r, 1)
    v = value.repeat_interleave(r, 1)
    pos = torch.arange(lk)
    g = handle.group_size_for(lk)
    qg_pos, kg_pos = grouped_positions(pos, s.window, g, s.mode)
    qpos = pos[lk - lq:]
    cq, sq = rotation(qg_pos[lk - lq:] - qpos.double(), inv_freq)
    ck, sk = rotation(kg_pos - pos.double(), inv_freq)
    scale = scaling or d**-0.5
    neighbor = torch.matmul(query, k.transpose(-1, -2)) * scale  # [B, H, Lq, Lk]
    grouped = torch.matmul(rotate(query, cq, sq), rotate(k, ck, sk).transpose(-1, -2)) * scale
    dist = qpos[:, None] - pos[None, :]
    scores = torch.where(dist < s.window, neighbor, grouped).masked_fill(dist < 0, float("-inf"))
    del neighbor, grouped
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return out.transpose(1, 2).contiguous(), None


# ------------------------------------------------------------------------------------------------
# one cell, in a subprocess
# ------------------------------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set size in a thread; ``peak`` is the largest value seen."""

    def __init__(self, interval=0.005):
        self.interval, self.peak, self._stop = interval, _rss(), threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def run_cell(model_spec: str, method_spec: str, length: int, decode_tokens: int, selfextend: Method,
             seed: int = 0) -> dict:
    """Time and memory of one (method, length) cell; ``selfextend`` gives the naive merge's settings."""
    import torch
    from transformers import AttentionInterface, DynamicCache

    import selfextend as se

    from .assets import load_model, trained_length
    from .evaluation.methods import SELFEXTEND_MODES, applied

    model, _ = load_model(model_spec)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(100, vocab - 1, (1, length + decode_tokens), generator=torch.Generator().manual_seed(seed))
    method = parse_method(method_spec, METHODS)
    if method.name == "naive":
        handle = se.enable(model, group_size=selfextend.group_size, window=selfextend.window,
                           mode=SELFEXTEND_MODES[selfextend.name])
        AttentionInterface.register("selfextend", naive_attention)  # this subprocess only
        settings = {"G": handle.group_size_for(length), "w": handle.window}
        context = contextlib.nullcontext(settings)
    else:
        context = applied(model, method, length)
    with context as settings:
        cache = DynamicCache(config=model.config)
        gc_before = _rss()
        with torch.no_grad(), PeakRSS() as mem:
            t0 = time.perf_counter()
            out = model(ids[:, :length], cache=cache, logits_to_keep=1)
            prefill = time.perf_counter() - t0
        steps = []
        with torch.no_grad():
            token = out.logits[:, -1:].argmax(-1)
            for i in range(decode_tokens):
                t0 = time.perf_counter()
                out = model(token, cache=cache)
                steps.append(time.perf_counter() - t0)
                token = out.logits[:, -1:].argmax(-1)
    decode = sorted(steps[1:] or steps)  # the first step builds the grouped-key cache: reported apart
    return {"method": method_spec, "length": length, "prefill_s": prefill, "peak_mem_bytes": mem.peak - gc_before,
            "decode_s_per_token": decode[len(decode) // 2] if decode else None,
            "first_decode_step_s": steps[0] if steps else None, "group_size": settings.get("G"),
            "window": settings.get("w"), "pretrained_length": trained_length(model)}


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    add_selfextend_arguments(parser)
    parser.add_argument("--lengths", type=positive_ints, default=[2048, 4096, 8192, 16384, 32768],
                        help="comma-separated token counts (default 2048,4096,8192,16384,32768)")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated, from {', '.join(METHODS)} (default {DEFAULT_METHODS}); SelfExtend "
                        "with fixed settings as name:G:w, e.g. selfextend:4:1024; -G/-w/--mode set what a bare "
                        "'selfextend' (and 'naive') means")
    parser.add_argument("--decode-tokens", type=positive_int, default=8, help="decode steps timed after each prefill")
    parser.add_argument("--out", default="results/bench", help="folder for bench.json / bench.md / bench.png")
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell (METHOD:LENGTH), print JSON


def _naive_bytes(length: int, heads: int) -> float:
    return 3 * heads * length * length * 4  # neighbor + grouped + merged scores, float32


def _selfextend_options(args) -> list[str]:
    """-G/-w/--mode as given, to pass on to the cell subprocesses."""
    options = ["--mode", args.mode]
    for flag, value in (("-G", args.group_size), ("-w", args.window)):
        if value is not None:
            options += [flag, str(value)]
    return options


def run(args) -> int:
    from .assets import load_config
    from .evaluation.methods import check_method, resolve_methods, selfextend_method

    selfextend = selfextend_method(args.group_size, args.window, args.mode)
    if args.cell:
        method, length = args.cell.rsplit(":", 1)
        row = run_cell(args.model, method, int(length), args.decode_tokens, selfextend)
        print("CELL " + json.dumps(row), flush=True)
        return 0
    # every check before the first cell: method names and settings against the model's config
    config = load_config(args.model)  # resolves (and downloads) the model once; no weights
    with bad_input():
        methods = resolve_methods(args.methods, selfextend, METHODS)
        for method in methods:
            check_method(selfextend if method.name == "naive" else method, config)
    heads = config.get_text_config().num_attention_heads
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    from tqdm import tqdm

    cells = [(m.spec, n) for n in args.lengths for m in methods]
    for method, length in tqdm(cells, desc="bench", unit="cell"):
        if method == "naive" and _naive_bytes(length, heads) > NAIVE_MEMORY_LIMIT:
            rows.append({"method": method, "length": length, "skipped":
                         f"needs ~{_naive_bytes(length, heads) / 1e9:.0f} GB of score matrices per layer"})
            continue
        cmd = [sys.executable, "-m", "selfextend.cli", "bench", "--model", args.model, "--cell",
               f"{method}:{length}", "--decode-tokens", str(args.decode_tokens), *_selfextend_options(args)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CELL ")]
        if proc.returncode != 0 or not lines:
            rows.append({"method": method, "length": length, "error": (proc.stderr or proc.stdout)[-400:]})
            tqdm.write(f"{method} {length}: failed\n{rows[-1]['error']}")
            continue
        rows.append(json.loads(lines[-1][5:]))
        r = rows[-1]
        tqdm.write(f"{method:>10} {length:>6}: prefill {r['prefill_s']:.2f}s  peak +{r['peak_mem_bytes'] / 2**20:.0f} MiB"
                   f"  decode {1000 * (r['decode_s_per_token'] or 0):.1f} ms/token")
    command = getattr(args, "command_line", None) or "selfextend bench " + " ".join(sys.argv[2:])
    report = {"command": command, "model": args.model,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "torch_threads": __import__("torch").get_num_threads()},
              "rows": rows}
    (out_dir / "bench.json").write_text(json.dumps(report, indent=1))
    table = markdown_table(rows)
    (out_dir / "bench.md").write_text(f"Command: `{report['command']}`\n\n{table}\n")
    plot(rows, out_dir / "bench.png")
    print(table)
    return 0


def _by(rows, method, length):
    for r in rows:
        if r["method"] == method and r["length"] == length and "prefill_s" in r:
            return r
    return None


def markdown_table(rows) -> str:
    lengths = sorted({r["length"] for r in rows})
    lines = ["| length | method | G | prefill s | x plain | peak MiB | x plain | decode ms/token | x plain |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n in lengths:
        base = _by(rows, "plain", n)
        for r in [r for r in rows if r["length"] == n]:
            if "prefill_s" not in r:
                lines.append(f"| {n} | {r['method']} | | {r.get('skipped') or 'failed'} | | | | | |")
                continue

            def ratio(key):
                return f"{r[key] / base[key]:.2f}" if base and base.get(key) else ""

            g = "" if r.get("group_size") is None else r["group_size"]
            lines.append(f"| {n} | {r['method']} | {g} | {r['prefill_s']:.2f} | {ratio('prefill_s')} | "
                         f"{r['peak_mem_bytes'] / 2**20:.0f} | {ratio('peak_mem_bytes')} | "
                         f"{1000 * r['decode_s_per_token']:.1f} | {ratio('decode_s_per_token')} |")
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for method, style in zip(methods, ("o-", "s-", "^--", "v-", "d-", "x-", "*-") * 3):
        pts = sorted((r["length"], r) for r in rows if r["method"] == method and "prefill_s" in r)
        if not pts:
            continue
        xs = [n for n, _ in pts]
        axes[0].plot(xs, [r["prefill_s"] for _, r in pts], style, label=method)
        axes[1].plot(xs, [r["peak_mem_bytes"] / 2**20 for _, r in pts], style, label=method)
        axes[2].plot(xs, [1000 * r["decode_s_per_token"] for _, r in pts], style, label=method)
    for ax, title in zip(axes, ("prefill time (s)", "prefill peak memory increase (MiB)", "decode (ms/token)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("input tokens")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
