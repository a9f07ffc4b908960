"""`selfextend eval`: passkey, longer keys, needle in a haystack, perplexity vs length, the ablation
of G and w and RULER's synthetic tasks (``ruler``, run only when named), every method on the same
inputs, resumable (the experiments, methods and report are :mod:`selfextend.evaluation`).

Each finished trial is one JSON line in ``OUT/results.jsonl``; rerunning the same command skips
what is done. ``OUT/report.md`` (tables) and PNG plots are rewritten after every experiment.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..evaluation.experiments import EXPERIMENTS, Grid, Inputs, Runner, record_command, trials
from ..evaluation.methods import DEFAULT_METHODS, PEERS, check_method, parse_method, resolve_methods, selfextend_method
from ..evaluation.ruler_runner import HaystackInputs, estimate, timing_model
from .common import (CommandError, add_model_argument, add_selfextend_arguments, bad_input, check_output_folder,
                     depth_list, positive_int, positive_ints, results_lock)


def task_list(text: str) -> list[str]:
    """argparse type: comma-separated RULER task names."""
    from ..evaluation.ruler import TASKS

    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        raise argparse.ArgumentTypeError(f"unknown RULER task {(unknown or [text])[0]!r}; choose from {', '.join(TASKS)}")
    return tasks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Grid(methods=[])
    parser.add_argument("experiments", nargs="*", metavar="EXPERIMENT",
                        help=f"which to run: {', '.join(EXPERIMENTS)} (default: all)")
    add_model_argument(parser)
    add_selfextend_arguments(parser)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default results/eval/<model>)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, default "
                        f"{','.join(DEFAULT_METHODS)}; also {', '.join(PEERS)} (STRING, DCA: selfextend.peers); "
                        "a SelfExtend mode takes fixed settings as name:G:w, e.g. selfextend:4:1024; "
                        "selfextend@RULE picks G and w per input length: @cover (w = L/4, the smallest G that "
                        "covers the input) or @f=F (w = L/8, grouped distances below F*L), e.g. selfextend@f=0.5, "
                        "selfextend@f=0.5:-:512 (fixed w); -G/-w/--mode set what a bare 'selfextend' means")
    parser.add_argument("--lengths", type=positive_ints, default=d.lengths, help="prompt lengths in tokens")
    parser.add_argument("--depths", type=depth_list, default=d.depths, help="depths in [0, 1] (default 10 depths)")
    parser.add_argument("--keys", type=positive_int, default=d.keys, help="random passkeys per (length, depth)")
    parser.add_argument("--key-digits", type=positive_ints, default=d.key_digits, help="keylength experiment: key sizes")
    parser.add_argument("--keylength-length", type=positive_int, default=d.keylength_length)
    parser.add_argument("--ppl-sequences", type=positive_int, default=d.ppl_sequences)
    parser.add_argument("--ablation-length", type=positive_int, default=d.ablation_length)
    parser.add_argument("--ablation-groups", type=positive_ints, default=d.ablation_groups)
    parser.add_argument("--ablation-windows", type=positive_ints, default=d.ablation_windows)
    parser.add_argument("--tasks", type=task_list, default=d.ruler_tasks,
                        help=f"ruler: RULER tasks, comma-separated (default all: {','.join(d.ruler_tasks)})")
    parser.add_argument("--haystacks", type=positive_int, default=d.haystacks,
                        help="ruler: haystacks per task and length (one prefill each per method)")
    parser.add_argument("--questions", type=positive_int, default=d.questions,
                        help="ruler: needle sets asked per haystack; cwe and fwe, whose haystack holds one "
                             "question, get --haystacks x --questions haystacks instead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true", help="only rewrite report.md and plots")


def run(args) -> int:
    from ..assets import load_config, load_model, load_tokenizer, model_name, trained_length
    from ..evaluation.report import report_header, write_report

    # every check (methods, settings, experiments, each input) before the weights load
    with bad_input():
        selfextend = selfextend_method(args.group_size, args.window, args.mode, args.rule)
        methods = resolve_methods(args.methods, selfextend)
    experiments = args.experiments or [e for e in EXPERIMENTS if e != "ruler"]
    unknown = [e for e in experiments if e not in EXPERIMENTS]
    if unknown:
        raise CommandError(f"unknown experiment {unknown[0]!r}; choose from {', '.join(EXPERIMENTS)}")
    config = load_config(args.model)
    L = trained_length(config)
    out = args.out or Path("results") / "eval" / model_name(args.model)
    _check_same_model(out, model_name(args.model), L)
    if args.report_only:  # runs nothing: the methods asked for need not suit this model
        if not (out / "results.jsonl").exists():
            raise CommandError(f"{out} has no results.jsonl; run the experiments first")
        print(f"report: {write_report(out, L, report_header(out, model_name(args.model), L))}")
        return 0
    check_output_folder(out)
    grid = Grid(methods=methods, lengths=args.lengths, depths=args.depths, keys=args.keys,
                key_digits=args.key_digits, keylength_length=args.keylength_length,
                ppl_sequences=args.ppl_sequences, ablation_length=args.ablation_length,
                ablation_groups=args.ablation_groups, ablation_windows=args.ablation_windows,
                ruler_tasks=args.tasks, haystacks=args.haystacks, questions=args.questions, seed=args.seed)
    todo = {experiment: trials(experiment, grid) for experiment in experiments}
    with bad_input():
        for spec in dict.fromkeys([selfextend.spec] + [t["method"] for ts in todo.values() for t in ts]):
            check_method(parse_method(spec), config)
    tokenizer = load_tokenizer(args.model)
    inputs = Inputs(tokenizer)
    ruler_inputs = HaystackInputs(tokenizer) if "ruler" in todo else None
    with bad_input():
        for experiment, experiment_trials in todo.items():
            (ruler_inputs if experiment == "ruler" else inputs).check(experiment_trials)

    with results_lock(out):  # a second run on this folder is refused before its weights load
        model, _ = load_model(args.model, tokenizer=tokenizer)
        record_command(out, getattr(args, "command_line", None))
        runner = Runner(model, tokenizer, out, inputs=inputs)
        header = report_header(out, model_name(args.model), L)
        if "ruler" in todo:
            print(estimate(todo["ruler"], runner, timing_model(model)), file=sys.stderr, flush=True)
        for experiment in experiments:
            print(f"== {experiment}", file=sys.stderr, flush=True)
            runner.run(todo[experiment], ruler_inputs)
            path = write_report(out, L, header, runner.records)
    print(f"report: {path}")
    return 0


def _check_same_model(out: Path, name: str, L: int) -> None:
    """Refuse a folder whose results came from a model of another trained length (its summary.json says):
    a report would be titled and cut at the wrong L, a run would mix two models' trials."""
    from ..evaluation.report import recorded_trained_length

    recorded = recorded_trained_length(out)
    if recorded is not None and recorded != L:
        raise CommandError(f"{out} holds results of a model with trained length {recorded}, and {name} has {L}; "
                           f"pass the folder's own --model (its commands.txt names it)")
