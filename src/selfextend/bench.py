"""Time and memory of SelfExtend against plain attention, same run, same inputs (``selfextend bench``).

Every (method, length) cell runs in its own subprocess (the command runs itself with ``--cell``), so
peak memory is that cell's own: the resident set is sampled every 5 ms during the prefill and
reported as the increase over the resident set just before it (on CUDA: the allocator's peak). After decoding, the memory SelfExtend
keeps beside the KV cache (its rotated grouped keys, ``sequence.decode_stats``) is reported too.
``--dtype`` and ``--device`` choose the model's precision and device. Methods:

    plain       the model's own attention (SDPA)
    selfextend  this library with -G/-w/--mode (default: G chosen by the paper's rule from the input length, w = L // 4); several settings
                in one run as ``selfextend:G:w`` (``-`` for a default), also ``rerope``, ``leaky:-:w``
    naive       the official implementation's merge with the settings of ``selfextend``: two full
                L x L score matrices per head, ``torch.where`` by distance, one softmax -- O(L^2)
                memory, run only where it fits

Here: one cell (:func:`run_cell`), the best of repeated cells, and the report (``bench.json``,
``bench.md``, ``bench.png``); the command (``selfextend.commands.bench``) runs the cells.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import threading
import time
from pathlib import Path

from .evaluation import render
from .evaluation.methods import Method, parse_method

METHODS = ("plain", "selfextend", "rerope", "leaky", "naive")  # method names --methods takes
DEFAULT_METHODS = "plain,selfextend,naive"
NAIVE_MEMORY_LIMIT = 12e9  # bytes of score matrices the naive merge may allocate before we skip it


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


@contextlib.contextmanager
def naive_applied(model, selfextend: Method, length: int):
    """Within the block, ``model`` runs the naive merge (selfextend.naive) with the settings of the
    SelfExtend method ``selfextend``; yields G and w as ``evaluation.methods.applied`` does."""
    import torch

    from .evaluation.methods import selfextend_settings, settings_record
    from .naive import use_naive_attention
    from .rope import layer_rotary
    from .schedule import Schedule

    settings = selfextend_settings(selfextend, model.config)
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None)

    def group_sizes(q_pos, last: int):  # no KV state here: G for the sequence of the keys the call sees
        schedule = Schedule.for_sequence(settings, last + 1)
        return torch.tensor([float(schedule.group_at(int(p))) for p in q_pos], dtype=torch.float64)

    def rotary(module):
        layer = layer_rotary(model, module, config, layer_types[module.layer_idx] if layer_types else None)
        return layer.inv_freq, layer.interleaved

    with use_naive_attention(model, settings.window, settings.mode, group_sizes, rotary):
        yield settings_record(settings, length)


class PeakCUDA:
    """The CUDA allocator's peak over the block, as ``peak`` (relative to the start: use with 0)."""

    def __enter__(self):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self._start = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        import torch

        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated() - self._start


def run_cell(model_spec: str, method_spec: str, length: int, decode_tokens: int,
             selfextend: Method = Method("selfextend"), seed: int = 0, dtype: str = "float32",
             device: str = "cpu") -> dict:
    """Time and memory of one (method, length) cell; ``selfextend`` gives the naive merge's settings."""
    import torch
    from transformers import DynamicCache

    from . import generation
    from .assets import load_model, trained_length
    from .sequence import decode_stats
    from .evaluation.methods import applied

    model, _ = load_model(model_spec, dtype=getattr(torch, dtype))
    model.to(device)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(100, vocab - 1, (1, length + decode_tokens), generator=torch.Generator().manual_seed(seed))
    method = parse_method(method_spec, METHODS)
    context = naive_applied(model, selfextend, length) if method.name == "naive" else applied(model, method, length)
    cache = DynamicCache(config=model.config)
    with context as settings:
        # greedy, never stopping early: the prefill's step, then one step per decode forward pass
        tokens = generation.decode_tokens(model, ids[:, :length], 1 + decode_tokens, cache=cache)
        gc_before = _rss() if device == "cpu" else 0
        with (PeakRSS() if device == "cpu" else PeakCUDA()) as mem:
            prefill = next(tokens).seconds
        steps = [step.seconds for step in tokens]
        kept = decode_stats(cache)["grouped_key_bytes"]
    decode = sorted(steps[1:] or steps)  # the first step builds the grouped-key cache: reported apart
    return {"method": method_spec, "length": length, "dtype": dtype, "device": device, "prefill_s": prefill,
            "peak_mem_bytes": mem.peak - gc_before, "grouped_key_bytes": kept,
            "decode_s_per_token": decode[len(decode) // 2] if decode else None,
            "first_decode_step_s": steps[0] if steps else None, "group_size": settings.get("G"),
            "window": settings.get("w"), "pretrained_length": trained_length(model)}


# ------------------------------------------------------------------------------------------------
# rows and the report
# ------------------------------------------------------------------------------------------------
def best_of(cells: tuple[dict, ...]) -> dict:
    """One row from repeated measurements of a cell: the smallest time and memory of each kind (the
    least disturbed by other processes), every value kept under ``"rounds"``."""
    done = [c for c in cells if "prefill_s" in c]
    if not done:
        return cells[0]
    best = dict(done[0])
    for key in ("prefill_s", "peak_mem_bytes", "decode_s_per_token", "first_decode_step_s"):
        values = [c[key] for c in done if c.get(key) is not None]
        best[key] = min(values) if values else None
    if len(cells) > 1:
        best["rounds"] = [{k: c.get(k) for k in ("prefill_s", "peak_mem_bytes", "decode_s_per_token")} for c in cells]
    return best


def skip_reason(method: str, length: int, heads: int) -> str | None:
    """Why the cell (``method``, ``length``) is not run on a model with ``heads`` attention heads (the
    naive merge's score matrices would not fit), or None."""
    needed = 3 * heads * length * length * 4  # neighbor + grouped + merged scores, float32
    if method == "naive" and needed > NAIVE_MEMORY_LIMIT:
        return f"needs ~{needed / 1e9:.0f} GB of score matrices per layer"
    return None


def write_results(out_dir: Path, rows: list[dict], command: str, model: str, dtype: str, device: str) -> str:
    """Write bench.json, bench.md and bench.png under ``out_dir``; return the Markdown table."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"command": command, "model": model, "dtype": dtype, "device": device,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "torch_threads": torch.get_num_threads()},
              "rows": rows}
    (out_dir / "bench.json").write_text(json.dumps(report, indent=1))
    table = markdown_table(rows)
    (out_dir / "bench.md").write_text(f"Command: `{report['command']}`\n\n{table}\n")
    plot(rows, out_dir / "bench.png")
    return table


def _plain_row(rows, length):
    for r in rows:
        if r["method"] == "plain" and r["length"] == length and "prefill_s" in r:
            return r
    return None


def markdown_table(rows) -> str:
    """One line per cell: prefill seconds, peak MiB and decode ms/token, each with its ratio to plain."""
    table = []
    for n in sorted({r["length"] for r in rows}):
        base = _plain_row(rows, n)
        for r in [r for r in rows if r["length"] == n]:
            if "prefill_s" not in r:
                table.append([n, r["method"], "", r.get("skipped") or "failed", "", "", "", "", "", ""])
                continue

            def ratio(key):
                return f"{r[key] / base[key]:.2f}" if base and base.get(key) else ""

            g = "" if r.get("group_size") is None else r["group_size"]
            table.append([n, r["method"], g, f"{r['prefill_s']:.2f}", ratio("prefill_s"),
                          f"{r['peak_mem_bytes'] / 2**20:.0f}", ratio("peak_mem_bytes"),
                          f"{1000 * r['decode_s_per_token']:.1f}", ratio("decode_s_per_token"),
                          f"{r.get('grouped_key_bytes', 0) / 2**20:.1f}"])
    header = ["length", "method", "G", "prefill s", "x plain", "peak MiB", "x plain", "decode ms/token", "x plain",
              "grouped keys MiB"]
    return render.markdown_table(header, table, align="rlrrrrrrrr")


def plot(rows, path: Path) -> None:
    """Prefill time, peak memory and decode time against length, a line per method (log-log)."""
    done = [r for r in rows if "prefill_s" in r]
    lengths = sorted({r["length"] for r in rows})
    panels = []
    for title, value in (("prefill time (s)", lambda r: r["prefill_s"]),
                         ("prefill peak memory increase (MiB)", lambda r: r["peak_mem_bytes"] / 2**20),
                         ("decode (ms/token)", lambda r: 1000 * r["decode_s_per_token"])):
        lines = {}
        for method in dict.fromkeys(r["method"] for r in done):
            points = sorted((r["length"], value(r)) for r in done if r["method"] == method)
            lines[method] = ([n for n, _ in points], [v for _, v in points])
        panels.append(render.Panel(lines, dict(title=title, xlabel="input tokens", xscale="log", yscale="log"),
                                   xticks=lengths, grid=True))
    render.save_line_plots(path, panels, panel_size=(5, 4.2), dpi=110)
