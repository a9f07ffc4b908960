"""Calibration: how far a model's own retrieval reaches (its effective length E), and the G and w
that keep SelfExtend's grouped distances below it (``selfextend calibrate``).

SelfExtend maps every far distance into the range the model was trained on. Many models retrieve
reliably only well inside that range, up to their *effective length* E; keeping the largest grouped
distance below E (the rule ``f=E/L`` of :func:`selfextend.positions.choose_settings`) uses only
distances the model still handles. The recommendation is pure (numbers in, settings out); the
measurements run as trials of the evaluation's :class:`~selfextend.evaluation.experiments.Runner`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from .. import prompts
from ..positions import (DEFAULT_MAX_GROUP_SIZE, DEFAULT_RULE, choose_group_size, max_extended_length, rule_window,
                         rule_window_and_reach)
from .experiments import trial_key
from .methods import parse_method

DEPTHS = (0.2, 0.5, 0.8)  # passkey depths per length, unless given


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


# -- the measurements ----------------------------------------------------------------------------
def passkey_trials(lengths: list[int], depths: list[float], seed: int) -> list[list[dict]]:
    """Plain-model passkey trials, one list per length (shortest first), a random key per trial."""
    rng = random.Random(seed)
    return [[dict(experiment="passkey", method="plain", length=n, depth=d, key=prompts.random_key(rng))
             for d in depths] for n in sorted(set(lengths))]


def plain_passkey(runner, per_length: list[list[dict]]) -> list[tuple[int, int, int]]:
    """(length, correct, trials) of the plain model per length, shortest first, up to and including
    the first length where it missed half or more (longer inputs will not do better)."""
    passkey = []
    for trials in per_length:
        runner.run(trials)
        correct = sum(runner.done[trial_key(t)]["score"] >= 1 for t in trials)
        passkey.append((trials[0]["length"], correct, len(trials)))
        if 2 * correct <= len(trials):
            break
    return passkey


def perplexity(runner, ppl_trial: dict, advice: Recommendation) -> dict[str, dict]:
    """label -> record of the perplexity trial: the plain model, the library's default, the advice."""
    # the default under the name of its rule, so a record never stands for another default
    methods = {"plain": "plain", "default (selfextend)": parse_method("selfextend").spec}
    if advice.settings:
        methods["recommended"] = f"selfextend:{advice.settings['group_size']}:{advice.settings['window']}"
    runner.run([{**ppl_trial, "method": spec} for spec in methods.values()])
    return {label: runner.done[trial_key({**ppl_trial, "method": spec})] for label, spec in methods.items()}
