"""Running RULER's tasks (``ruler.py``) on a CPU: one prefill per haystack and method, then every
question about that haystack asked from a copy of the KV cache (``copy.deepcopy`` of a
``DynamicCache`` continues as the original would, for SelfExtend and for the peers alike: both keep
what a sequence chose on the cache object), greedy decoding until the end-of-sequence token or the
task's token limit. One JSON line per question; a rerun skips the questions already recorded.
"""

from __future__ import annotations

import copy
import sys
import time
from collections import defaultdict

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..sequence import prompt_length
from ..generation import decode_tokens, end_of_sequence_tokens
from .methods import applied, parse_method
from .ruler import TASKS, Builder, Haystack, make_haystack, questions_per_haystack, score


def ruler_trials(methods, lengths, tasks, haystacks: int, questions: int, seed: int) -> list[dict]:
    """Every question of every haystack, haystacks outermost, then methods, so that one prefill serves a
    method's questions about one haystack and every method sees the same prompts. Every task gets
    ``haystacks * questions`` questions a cell: the tasks whose haystack holds one question (cwe, fwe) get
    that many haystacks."""
    out = []
    for length in lengths:
        for task in tasks:
            sets = questions_per_haystack(task, questions)
            for h in range(haystacks * questions // sets):
                for m in methods:
                    out += [dict(experiment="ruler", method=m.spec, length=length, task=task, haystack=h, sets=sets,
                                 question=q, seed=seed) for q in range(sets)]
    return out


class HaystackInputs:
    """The haystacks of a run, built from the tokenizer alone (and checked before any model runs)."""

    def __init__(self, tokenizer):
        from ..assets import essay_text

        self.builder = Builder(tokenizer)
        self._essays = None
        self._essay_text = essay_text
        self._made = {}

    def get(self, trial: dict) -> Haystack:
        key = (trial["task"], trial["length"], trial["haystack"], trial["sets"], trial["seed"])
        if key not in self._made:
            if self._essays is None and TASKS[trial["task"]].haystack == "essay":
                self._essays = self._essay_text()
            self._made = {key: make_haystack(self.builder, trial["task"], trial["length"], trial["haystack"],
                                             trial["sets"], trial["seed"], self._essays)}
        return self._made[key]

    def check(self, todo: list[dict]) -> None:
        for trial in {(t["task"], t["length"], t["haystack"], t["sets"], t["seed"]): t for t in todo}.values():
            try:
                haystack = self.get(trial)
            except ValueError as e:
                raise ValueError(f"ruler {trial['task']} at length {trial['length']}: {e}") from None
            if haystack.length > trial["length"]:
                raise ValueError(f"ruler {trial['task']}: the prompt has {haystack.length} tokens, more than "
                                 f"{trial['length']}")


def _groups(todo: list[dict]) -> dict:
    """(length, task, haystack, seed, method) -> its question trials, in order."""
    groups = defaultdict(list)
    for t in todo:
        groups[(t["length"], t["task"], t["haystack"], t["sets"], t["seed"], t["method"])].append(t)
    return groups


# A haystack longer than this is prefilled in chunks of PREFILL_CHUNK tokens. transformers' own attention
# (the plain model, the rope scalings) builds a dense [query, key] mask on sliding-window layers and
# attends over all of it: one pass over Gemma 3 at 48k held ~14 GB and did not finish in 30 minutes.
# In chunks the masks are [chunk, key] and sliding layers see chunk + window keys.
LONG_PROMPT = 32768
PREFILL_CHUNK = 1024


def prefill_chunk(method_name: str, length: int) -> int | None:
    """Chunk size for prefilling a ``length``-token haystack with ``method_name``, None for one pass.

    Chunks through the cache compute what one pass computes for every method but dynamic NTK:
    transformers recomputes its frequencies per forward from the longest position seen, so the first
    chunks' keys would be rotated at the trained scale (tests/test_ruler.py shows both)."""
    return PREFILL_CHUNK if length > LONG_PROMPT and method_name != "dynamic" else None


@torch.inference_mode()
def _prefill(model, ids: list[int], total: int, chunk: int | None = None) -> DynamicCache:
    """The haystack's prefix through the cache, in one forward pass or ``chunk`` tokens at a time;
    SelfExtend and DCA are told the full prompt length first, so they choose their G / scale for the
    whole prompt, as one pass over it would."""
    cache = DynamicCache(config=model.config)
    step = chunk or len(ids)
    with prompt_length(total):
        for start in range(0, len(ids), step):
            model(torch.tensor([ids[start:start + step]], device=model.device), cache=cache, logits_to_keep=1)
    return cache


def ask(model, tokenizer, cache: DynamicCache, suffix_ids: list[int], new_tokens: int) -> str:
    """The greedy answer to one question from a copy of ``cache`` (``cache`` is left as it was)."""
    eos = end_of_sequence_tokens(model, tokenizer)
    tokens = []
    for step in decode_tokens(model, suffix_ids, new_tokens, cache=copy.deepcopy(cache)):
        if step.token in eos:
            break
        tokens.append(step.token)
    return tokenizer.decode(tokens, skip_special_tokens=True)


def run_ruler(runner, todo: list[dict], inputs: HaystackInputs) -> None:
    """Run the ``todo`` question trials on ``runner`` (an ``experiments.Runner``), appending a record per
    question; a method whose questions all compute what an earlier method computed copies them."""
    remaining = [t for t in todo if runner.key(t) not in runner.done]
    if len(remaining) < len(todo):
        tqdm.write(f"{len(todo) - len(remaining)} of {len(todo)} ruler questions already done; skipping them",
                   file=sys.stderr)
    groups = _groups(remaining)
    with tqdm(total=len(groups), desc="haystacks x methods", unit="prefill") as bar:
        for (length, task, h, sets, seed, method), trials in groups.items():
            bar.set_postfix_str(f"{task} {length} {method}")
            haystack = inputs.get(trials[0])
            copies = [runner.copied(t) for t in trials]
            if all(c is not None for c in copies):
                for record in copies:
                    runner.append(record)
            else:
                _run_group(runner, haystack, trials)
            bar.update(1)


def _run_group(runner, haystack: Haystack, trials: list[dict]) -> None:
    model, tokenizer = runner.model, runner.tokenizer
    spec = TASKS[haystack.task]
    method = parse_method(trials[0]["method"])
    chunk = prefill_chunk(method.name, haystack.length)
    with applied(model, method, trials[0]["length"]) as settings:
        t0 = time.perf_counter()
        cache = _prefill(model, haystack.prefix_ids, haystack.length, chunk)
        prefill_seconds = time.perf_counter() - t0
        for trial in trials:
            question = haystack.questions[trial["question"]]
            t1 = time.perf_counter()
            answer = ask(model, tokenizer, cache, question.suffix_ids, spec.new_tokens)
            runner.append({"trial": trial, "settings": settings, "answer": answer,
                           "score": score(answer, question.answers), "expected": question.answers,
                           "depths": [round(d, 4) for d in question.depths],
                           "prompt_tokens": len(haystack.prefix_ids) + len(question.suffix_ids),
                           "prefill_seconds": round(prefill_seconds, 2),
                           **({"prefill_chunk": chunk} if chunk else {}),
                           "seconds": round(time.perf_counter() - t1 + prefill_seconds / len(trials), 2)})


def timing_model(model, lengths=(1024, 2048)) -> tuple[float, float, float, float]:
    """Seconds of the plain model on this machine, now: a prefill of n tokens ~ a n + b n^2 and a decode
    step ~ c + d n, fitted on two short passes (for the estimate printed before a run)."""
    times, steps = [], []
    with torch.inference_mode():
        for n in lengths:
            vocab = model.config.get_text_config().vocab_size
            ids = torch.randint(0, min(vocab, 1000), (1, n), generator=torch.Generator().manual_seed(0))
            cache = DynamicCache(config=model.config)
            t0 = time.perf_counter()
            model(ids, cache=cache, logits_to_keep=1)
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in range(4):
                model(ids[:, :1], cache=cache, logits_to_keep=1)
            steps.append((time.perf_counter() - t0) / 4)
    (n1, n2), (t1, t2), (s1, s2) = lengths, times, steps
    b = max(0.0, (t2 - t1 * n2 / n1) / (n2 * n2 - n1 * n2))
    a = max(0.0, (t1 - b * n1 * n1) / n1)
    d = max(0.0, (s2 - s1) / (n2 - n1))
    return a, b, max(0.0, s1 - d * n1), d


def _predicted(fit, length: int, task: str, questions: int) -> float:
    """Seconds the timing model gives one prefill of ``length`` tokens and ``questions`` answers to it."""
    a, b, c, d = fit
    return a * length + b * length * length + questions * TASKS[task].new_tokens * 0.6 * (c + d * length)


def recorded_scale(records: list[dict], fit) -> dict[int, float]:
    """Per length: the seconds this folder's finished prefill groups took, over what ``fit`` predicts for
    them (a fit on two short passes misses how long contexts strain the caches; the run's own record does
    not). Copied records (``same_as``) took no time and are left out."""
    ran = [r for r in records if r["trial"]["experiment"] == "ruler" and "same_as" not in r and "seconds" in r]
    took, predicted = defaultdict(float), defaultdict(float)
    for (length, task, *_), group in _groups([r["trial"] for r in ran]).items():
        predicted[length] += _predicted(fit, length, task, len(group))
    for r in ran:  # each question's seconds hold its answer and its share of the prefill
        took[r["trial"]["length"]] += r["seconds"]
    return {n: took[n] / predicted[n] for n in took if predicted[n] > 0}


def estimate(todo: list[dict], runner, fit) -> str:
    """What the ``todo`` questions will cost: prefills, questions and hours from ``fit`` (timing_model),
    scaled at each length by what this folder's finished groups took at the nearest recorded length."""
    scales = recorded_scale(runner.records, fit)
    groups = _groups([t for t in todo if runner.key(t) not in runner.done])
    seconds, prefills, questions = 0.0, 0, 0
    for (length, task, *_), trials in groups.items():
        if all(runner.copied(t) is not None for t in trials):
            continue
        prefills += 1
        questions += len(trials)
        nearest = min(scales, key=lambda n: (abs(n - length), -n), default=None)
        seconds += _predicted(fit, length, task, len(trials)) * (scales[nearest] if nearest else 1.0)
    basis = "from a timed 1024/2048-token pass of the plain model"
    if scales:
        basis += (", scaled by what this folder's finished prefills took: " +
                  ", ".join(f"x{scales[n]:.1f} at {n}" for n in sorted(scales)))
    return (f"CPU estimate: {prefills} prefills and {questions} questions to run, about {seconds / 3600:.1f} h "
            f"on this machine now ({basis}; decoding taken at 60% of each task's token limit)")
