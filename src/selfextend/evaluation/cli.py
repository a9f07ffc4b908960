"""`selfextend eval`: passkey, longer keys, needle in a haystack, perplexity vs length and the
ablation of G and w, every method on the same inputs, resumable.

Each finished trial is one JSON line in ``OUT/results.jsonl``; rerunning the same command skips
what is done. ``OUT/report.md`` (tables) and PNG plots are rewritten after every experiment.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..commands.common import load_or_exit, positive_int
from .experiments import EXPERIMENTS, Grid, Runner, trials
from .methods import ALL_METHODS, parse_methods


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"depths must be in [0, 1], got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Grid(methods=[])
    parser.add_argument("experiments", nargs="*", metavar="EXPERIMENT",
                        help=f"which to run: {', '.join(EXPERIMENTS)} (default: all)")
    parser.add_argument("--model", default="smollm2-135m", help="built-in name, HF folder or .gguf file")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default results/eval/<model>)")
    parser.add_argument("--methods", default=",".join(ALL_METHODS), help=f"comma-separated, default {','.join(ALL_METHODS)}; "
                        "a SelfExtend mode takes fixed settings as name:G:w, e.g. selfextend:4:1024")
    parser.add_argument("--lengths", type=_ints, default=d.lengths, help="prompt lengths in tokens")
    parser.add_argument("--depths", type=_floats, default=d.depths, help="depths in [0, 1] (default 10 depths)")
    parser.add_argument("--keys", type=positive_int, default=d.keys, help="random passkeys per (length, depth)")
    parser.add_argument("--key-digits", type=_ints, default=d.key_digits, help="keylength experiment: key sizes")
    parser.add_argument("--keylength-length", type=positive_int, default=d.keylength_length)
    parser.add_argument("--ppl-sequences", type=positive_int, default=d.ppl_sequences)
    parser.add_argument("--ablation-length", type=positive_int, default=d.ablation_length)
    parser.add_argument("--ablation-groups", type=_ints, default=d.ablation_groups)
    parser.add_argument("--ablation-windows", type=_ints, default=d.ablation_windows)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true", help="only rewrite report.md and plots")


def run(args) -> int:
    from ..assets import model_name
    from .report import write_report

    try:
        methods = parse_methods(args.methods)
    except ValueError as e:
        print(f"selfextend: error: {e}", file=sys.stderr)
        return 2
    experiments = args.experiments or list(EXPERIMENTS)
    unknown = [e for e in experiments if e not in EXPERIMENTS]
    if unknown:
        print(f"selfextend: error: unknown experiment {unknown[0]!r}; choose from {', '.join(EXPERIMENTS)}",
              file=sys.stderr)
        return 2
    out = args.out or Path("results") / "eval" / model_name(args.model)
    grid = Grid(methods=methods, lengths=args.lengths, depths=args.depths, keys=args.keys,
                key_digits=args.key_digits, keylength_length=args.keylength_length,
                ppl_sequences=args.ppl_sequences, ablation_length=args.ablation_length,
                ablation_groups=args.ablation_groups, ablation_windows=args.ablation_windows, seed=args.seed)
    model, tokenizer = load_or_exit(args.model)
    L = model.config.get_text_config().max_position_embeddings
    command = "selfextend eval " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["eval"] else ""
    out.mkdir(parents=True, exist_ok=True)
    if command and not args.report_only:  # the commands that added trials: rerun them to reproduce
        with (out / "commands.txt").open("a") as f:
            f.write(command + "\n")
    runner = Runner(model, tokenizer, out)
    header = _header(out, model_name(args.model), L)
    for experiment in experiments:
        if not args.report_only:
            print(f"== {experiment}", file=sys.stderr, flush=True)
            runner.run(trials(experiment, grid))
        path = write_report(out, L, header)
    print(f"report: {path}")
    return 0


def _header(out: Path, name: str, L: int) -> str:
    commands = (out / "commands.txt").read_text().splitlines() if (out / "commands.txt").exists() else []
    text = f"# Evaluation: {name} (trained length {L})\n\nProduced by these commands, in order (a rerun skips finished trials):\n\n"
    return text + "```\n" + "\n".join(commands) + "\n```\n\n"
