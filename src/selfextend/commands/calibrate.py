"""`selfextend calibrate`: measure how far a model's own retrieval reaches, and recommend G and w.

The recommendation and the measurements are :mod:`selfextend.evaluation.calibration`. The command:

1. runs the plain model on the passkey prompt at a few lengths up to the trained length L (a few
   depths each), from the shortest up, and stops after the first length where it misses at least
   half of the depths: E is the longest length before that;
2. derives G and w for the target length from E (w = L // 8, G the smallest with (E - w) * G + w >=
   target);
3. measures perplexity on the essays at one check length: plain, the library's default, the recommendation;
4. prints the numbers, the same advice as a rule for any length (``enable(model, rule="f=E/L")``), then
   the settings for the target as one JSON line for ``selfextend.enable(model, **settings)``.

Trials run through the evaluation's runner: with ``--out`` they are kept (``results.jsonl``) and a
rerun skips the finished ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from ..evaluation.calibration import DEPTHS
from .common import (add_model_argument, bad_input, check_output_folder, depth_list, positive_int, positive_ints,
                     results_lock)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--target-length", type=positive_int, default=None,
                        help="input length to recommend G and w for (default 4 x the trained length)")
    parser.add_argument("--lengths", type=positive_ints, default=None,
                        help="passkey lengths for the plain model, tried from the shortest up "
                        "(default L/4, L/2, 3L/4 and L)")
    parser.add_argument("--depths", type=depth_list, default=list(DEPTHS),
                        help=f"passkey depths in [0, 1] per length (default {','.join(map(str, DEPTHS))})")
    parser.add_argument("--ppl-length", type=positive_int, default=None,
                        help="perplexity check length (default the smaller of the target and 1.5 x L)")
    parser.add_argument("--out", type=Path, default=None,
                        help="keep the trials in this folder (results.jsonl, resumable) and write calibration.json")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random passkeys")


def run(args) -> int:
    from ..assets import load_config, load_model, load_tokenizer, model_name, trained_length
    from ..evaluation.calibration import (check_target, effective_length, passkey_trials, perplexity, plain_passkey,
                                          recommend)
    from ..evaluation.experiments import Inputs, Runner

    # every check (output folder, lengths, depths, prompts, the essays) before the weights load
    if args.out is not None:
        check_output_folder(args.out)
    L = trained_length(load_config(args.model))
    target = args.target_length or 4 * L
    with bad_input():
        check_target(target, L)
    per_length = passkey_trials(args.lengths or [L // 4, L // 2, 3 * L // 4, L], args.depths, args.seed)
    ppl_trial = dict(experiment="perplexity", length=args.ppl_length or min(target, 3 * L // 2), sequence=0)
    tokenizer = load_tokenizer(args.model)
    inputs = Inputs(tokenizer)
    with bad_input():
        inputs.check([t for ts in per_length for t in ts] + [{**ppl_trial, "method": "plain"}])

    with tempfile.TemporaryDirectory() as tmp, results_lock(args.out or Path(tmp)):
        model, _ = load_model(args.model, tokenizer=tokenizer)
        runner = Runner(model, tokenizer, args.out or Path(tmp), inputs=inputs)
        passkey = plain_passkey(runner, per_length)
        effective = effective_length(passkey)
        advice = recommend(effective, L, target)
        ppl = perplexity(runner, ppl_trial, advice)
    summary = {"model": model_name(args.model), "trained_length": L, "target_length": target,
               "passkey": [dict(length=n, correct=k, trials=t) for n, k, t in passkey],
               "effective_length": effective, "reason": advice.reason, "settings": advice.settings,
               "rule_settings": advice.rule,
               "perplexity": {label: {"length": ppl_trial["length"], **r["settings"], "ppl": r["ppl"]}
                              for label, r in ppl.items()}}
    _print(summary, args.model, len(args.depths))
    if args.out:
        (args.out / "calibration.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"[calibrate] trials in {args.out / 'results.jsonl'}, summary in {args.out / 'calibration.json'}",
              file=sys.stderr)
    return 0


def _print(summary: dict, model: str, depths: int) -> None:
    """The numbers and the recommendation on stdout; the last line is the settings as JSON."""
    from ..evaluation.render import markdown_table

    L, target, effective, settings = (summary[k] for k in ("trained_length", "target_length", "effective_length",
                                                           "settings"))
    print(f"selfextend calibrate: {summary['model']}, trained length L = {L}, target {target} tokens\n")
    print(f"Plain model, passkey at {depths} depths per length (from the shortest up; stops after the first "
          "length with half or more missed):\n")
    print(markdown_table(["length", "correct", "held"], [[r["length"], f"{r['correct']}/{r['trials']}",
                                                          "yes" if 2 * r["correct"] > r["trials"] else "no"]
                                                         for r in summary["passkey"]], align="rll") + "\n")
    print(f"Effective length E = {effective} tokens ({effective / L:.3g} x L).\n" if effective else
          "Effective length: none of the lengths tried.\n")
    print(f"Recommendation: {summary['reason']}.\n")
    ppl = summary["perplexity"]
    default = ppl["default (selfextend)"]["ppl"]
    rows = [[label, r.get("G", "-"), r.get("w", "-"), r["ppl"],
             f"{r['ppl'] / default - 1:+.1%}" if label == "recommended" else ""] for label, r in ppl.items()]
    print(f"Perplexity at {ppl['plain']['length']} tokens of the essays (lower is better):\n")
    print(markdown_table(["settings", "G", "w", "perplexity", "vs default"], rows, align="lrrrr") + "\n")
    call = "".join(f", {k}={v}" for k, v in settings.items())
    print(f"For {target} tokens: selfextend.enable(model{call})")
    if settings:
        print(f"(check it: selfextend passkey --model {model} --length {target} "
              f"-G {settings['group_size']} -w {settings['window']})")
    if summary.get("rule_settings"):
        rule = summary["rule_settings"]
        print(f"For any length, G chosen from each input's length: selfextend.enable(model, rule={rule['rule']!r}, "
              f"window={rule['window']})  (commands: --rule {rule['rule']} -w {rule['window']})")
    print(json.dumps(settings))
