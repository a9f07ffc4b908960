"""`selfextend calibrate`: measure how far a model's own retrieval reaches, and recommend G and w.

SelfExtend maps every far distance into the range the model was trained on. Many models retrieve
reliably only well inside that range, up to their *effective length* E; keeping the largest grouped
distance below E (the rule ``f=E/L`` of :func:`selfextend.positions.choose_settings`) uses only
distances the model still handles. The command:

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
from dataclasses import dataclass, replace
from pathlib import Path

from ..positions import (DEFAULT_MAX_GROUP_SIZE, DEFAULT_RULE, choose_group_size, max_extended_length, rule_window,
                         rule_window_and_reach)
from .common import add_model_argument, bad_input, check_output_folder, positive_int, positive_ints

DEPTHS = (0.2, 0.5, 0.8)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..evaluation.cli import depth_list

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


# -- the recommendation (pure: numbers in, settings out) -------------------------------------------
@dataclass(frozen=True)
class Recommendation:
    settings: dict   # keyword arguments of selfextend.enable for the target length: {} = the library's default
    reason: str      # one line: where the settings come from
    rule: dict | None = None  # the same advice for any length: enable(model, **rule), G chosen per input


def effective_length(passkey: list[tuple[int, int, int]]) -> int | None:
    """The longest length, going up from the shortest, before the first one where the plain model
    missed at least half of the trials; ``passkey`` holds (length, correct, trials). None if it failed
    at the shortest."""
    effective = None
    for length, correct, trials in sorted(passkey):
        if 2 * correct <= trials:
            break
        effective = length
    return effective


def _window(L: int, effective: int) -> int:
    """The recommendation's w: L // 8 unless the effective length E is tiny (then about E / 2)."""
    return min(L // 8, max(1, min(effective, L) // 2))


def furthest_target(L: int) -> int:
    """The longest input any recommendation can serve on a model trained on ``L`` tokens: the extended
    limit ``(L - w) * G + w`` of the rule f=1 (E = L, w = L // 8) at the largest G the rules choose."""
    return int(max_extended_length(L, _window(L, L), DEFAULT_MAX_GROUP_SIZE))


def check_target(target: int, L: int) -> None:
    """ValueError, stating the limit, for a target no G and w can reach on a model trained on ``L``."""
    furthest = furthest_target(L)
    if target > furthest:
        raise ValueError(f"--target-length {target} is out of reach: SelfExtend extends a model trained on {L} "
                         f"tokens to at most {furthest} tokens ((L - w) * G + w with w = {_window(L, L)} and the "
                         f"largest G the rules choose, {DEFAULT_MAX_GROUP_SIZE}); choose a target up to {furthest}")


def recommend(effective: int | None, L: int, target: int) -> Recommendation:
    """G and w for ``target`` tokens on a model trained on ``L`` whose plain retrieval holds up to
    ``effective`` tokens (``target`` at most :func:`furthest_target`)."""
    if effective is None:
        reason = "the plain model missed the passkey already at the shortest length, so its retrieval cannot guide G and w"
        default_limit = int(max_extended_length(L, rule_window(DEFAULT_RULE, L), DEFAULT_MAX_GROUP_SIZE))
        if target <= default_limit:
            return Recommendation({}, f"{reason}; keep the default")
        advice = recommend(L, L, target)  # the default stops short: the rule that reaches furthest
        return replace(advice, reason=f"{reason}, and the default reaches only {default_limit} tokens: {advice.reason}")
    if target <= min(L, effective):
        return Recommendation({}, f"{target} tokens fit the trained length and the plain model retrieves there; "
                                  "enable(model) leaves such inputs exact")
    reach = min(1.0, effective / L)
    rule = f"f={reach:g}"
    # past L, or within it but beyond where the plain model retrieves: group either way
    window, reach_tokens = rule_window_and_reach(rule, L, _window(L, effective))
    group_size = choose_group_size(target, reach_tokens, window)
    limit = int(max_extended_length(L, window, group_size))
    covered = int(max_extended_length(reach_tokens, window, group_size))  # grouped distances below E up to here
    reason = f"rule {rule} (largest grouped distance below {reach_tokens} tokens = E): w = {window}, "
    if covered >= target:
        reason += (f"G = the smallest with ({reach_tokens} - {window}) * G + {window} >= {target} -> G = {group_size} "
                   f"(extended limit {limit})")
    else:
        reason += (f"G = {group_size}, the largest the rules choose, keeps grouped distances below E only up to "
                   f"{covered} tokens, short of the target {target}; past that they grow up to L (extended limit "
                   f"{limit})")
    return Recommendation({"group_size": group_size, "window": window}, reason, {"rule": rule, "window": window})


# -- the command -----------------------------------------------------------------------------------
def _passkey_trials(lengths: list[int], depths: list[float], seed: int) -> list[list[dict]]:
    """Plain-model passkey trials, one list per length (shortest first), a random key per trial."""
    import random

    from .. import prompts

    rng = random.Random(seed)
    return [[dict(experiment="passkey", method="plain", length=n, depth=d, key=prompts.random_key(rng))
             for d in depths] for n in sorted(set(lengths))]


def run(args) -> int:
    from ..assets import load_config, load_model, load_tokenizer, model_name, trained_length
    from ..evaluation.cli import results_lock
    from ..evaluation.experiments import Inputs, Runner

    # every check (output folder, lengths, depths, prompts, the essays) before the weights load
    if args.out is not None:
        check_output_folder(args.out)
    L = trained_length(load_config(args.model))
    target = args.target_length or 4 * L
    with bad_input():
        check_target(target, L)
    per_length = _passkey_trials(args.lengths or [L // 4, L // 2, 3 * L // 4, L], args.depths, args.seed)
    ppl_trial = dict(experiment="perplexity", length=args.ppl_length or min(target, 3 * L // 2), sequence=0)
    tokenizer = load_tokenizer(args.model)
    inputs = Inputs(tokenizer)
    with bad_input():
        inputs.check([t for ts in per_length for t in ts] + [{**ppl_trial, "method": "plain"}])

    with tempfile.TemporaryDirectory() as tmp, results_lock(args.out or Path(tmp)):
        model, _ = load_model(args.model, tokenizer=tokenizer)
        runner = Runner(model, tokenizer, args.out or Path(tmp), inputs=inputs)
        passkey = _plain_passkey(runner, per_length)
        effective = effective_length(passkey)
        advice = recommend(effective, L, target)
        ppl = _perplexity(runner, ppl_trial, advice)
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


def _plain_passkey(runner, per_length: list[list[dict]]) -> list[tuple[int, int, int]]:
    """(length, correct, trials) of the plain model per length, shortest first, up to and including
    the first length where it missed half or more (longer inputs will not do better)."""
    from ..evaluation.experiments import trial_key

    passkey = []
    for trials in per_length:
        runner.run(trials)
        correct = sum(runner.done[trial_key(t)]["score"] >= 1 for t in trials)
        passkey.append((trials[0]["length"], correct, len(trials)))
        if 2 * correct <= len(trials):
            break
    return passkey


def _perplexity(runner, ppl_trial: dict, advice: Recommendation) -> dict[str, dict]:
    """label -> record of the perplexity trial: the plain model, the library's default, the advice."""
    from ..evaluation.experiments import trial_key

    from ..evaluation.methods import parse_method

    # the default under the name of its rule, so a record never stands for another default
    methods = {"plain": "plain", "default (selfextend)": parse_method("selfextend").spec}
    if advice.settings:
        methods["recommended"] = f"selfextend:{advice.settings['group_size']}:{advice.settings['window']}"
    runner.run([{**ppl_trial, "method": spec} for spec in methods.values()])
    return {label: runner.done[trial_key({**ppl_trial, "method": spec})] for label, spec in methods.items()}


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
