"""`selfextend bench`: time and memory of SelfExtend against plain attention, same run, same inputs.

Every (method, length) cell runs in a fresh subprocess of this command (``--cell METHOD:LENGTH``,
internal), which prints its row as one ``CELL {json}`` line; the measurements and the report are
:mod:`selfextend.bench`. Prints a table, writes ``bench.json``, ``bench.md`` and ``bench.png`` under
``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from ..bench import DEFAULT_METHODS, METHODS
from .common import (add_model_argument, add_selfextend_arguments, bad_input, check_output_folder, positive_int,
                     positive_ints)

CELL_PREFIX = "CELL "  # the line of a cell subprocess's stdout that holds its row


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
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="the model's precision (default float32)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--repeat", type=positive_int, default=1,
                        help="measure every cell this many times, methods interleaved; report the smallest (default 1)")
    parser.add_argument("--out", default="results/bench", help="folder for bench.json / bench.md / bench.png")
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell (METHOD:LENGTH), print JSON


def run(args) -> int:
    from tqdm import tqdm

    from ..bench import best_of, run_cell, write_results
    from ..evaluation.methods import selfextend_method

    with bad_input():
        selfextend = selfextend_method(args.group_size, args.window, args.mode, args.rule)
    if args.cell:
        method, length = args.cell.rsplit(":", 1)
        row = run_cell(args.model, method, int(length), args.decode_tokens, selfextend, dtype=args.dtype,
                       device=args.device)
        print(CELL_PREFIX + json.dumps(row), flush=True)
        return 0
    methods, heads = _check(args, selfextend)
    check_output_folder(args.out)  # the results are written after the last cell
    rows = []
    for n in tqdm(args.lengths, desc="bench", unit="length"):
        # each method once per round, rounds interleaved, so a burst of other load hits all methods
        rounds = [[_measure(args, method.spec, n, heads) for method in methods] for _ in range(args.repeat)]
        for r in (best_of(cells) for cells in zip(*rounds)):
            rows.append(r)
            if "prefill_s" in r:
                tqdm.write(f"{r['method']:>10} {n:>6}: prefill {r['prefill_s']:.2f}s  peak "
                           f"+{r['peak_mem_bytes'] / 2**20:.0f} MiB  decode {1000 * r['decode_s_per_token']:.1f} ms/token")
            else:
                tqdm.write(f"{r['method']:>10} {n:>6}: " + (r.get("skipped") or "failed:\n" + r["error"]))
    print(write_results(Path(args.out), rows, getattr(args, "command_line", "selfextend bench"), args.model,
                        args.dtype, args.device))
    return 0


def _check(args, selfextend):
    """(methods, attention heads): every method and its settings checked against the model's config
    (read once, no weights) before the first cell; a bad one is a CommandError."""
    from ..assets import load_config
    from ..evaluation.methods import check_method, resolve_methods

    config = load_config(args.model)
    with bad_input():
        methods = resolve_methods(args.methods, selfextend, METHODS)
        for method in methods:
            check_method(selfextend if method.name == "naive" else method, config)
    return methods, config.get_text_config().num_attention_heads


def _selfextend_options(args) -> list[str]:
    """-G/--rule/-w/--mode as given, to pass on to the cell subprocesses."""
    options = ["--mode", args.mode]
    for flag, value in (("-G", args.group_size), ("--rule", args.rule), ("-w", args.window)):
        if value is not None:
            options += [flag, str(value)]
    return options


def _measure(args, method: str, length: int, heads: int) -> dict:
    """One cell's row, measured in a fresh subprocess (or why it was skipped or failed)."""
    from ..bench import skip_reason

    if (reason := skip_reason(method, length, heads)) is not None:
        return {"method": method, "length": length, "skipped": reason}
    cmd = [sys.executable, "-m", "selfextend.cli", "bench", "--model", args.model, "--cell", f"{method}:{length}",
           "--decode-tokens", str(args.decode_tokens), "--dtype", args.dtype, "--device", args.device,
           *_selfextend_options(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(CELL_PREFIX)]
    if proc.returncode != 0 or not lines:
        return {"method": method, "length": length, "error": (proc.stderr or proc.stdout)[-400:]}
    return json.loads(lines[-1][len(CELL_PREFIX):])
