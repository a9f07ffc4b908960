"""Experiments as lists of trials; a runner that appends one JSON line per finished trial.

A trial is a flat dict of what defines it (experiment, method, length, depth, ...). Its ``key``
is that dict serialised, so a rerun skips every trial already in the JSONL file: an interrupted
run loses at most the trial in progress. Trials that share an input (same experiment, length,
depth, key) run back to back, one per method, so every method sees exactly the same token ids.
A run holds :class:`FolderLock` on its folder, so a second run there is refused instead of running
the same trials again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import prompts
from ..generation import generate
from .methods import Method, applied, computation, log_likelihoods, parse_method, recorded_settings
from .ruler import TASKS as RULER_TASKS
from .ruler_runner import HaystackInputs, run_ruler, ruler_trials

EXPERIMENTS = ("passkey", "keylength", "needle", "perplexity", "ablation", "ruler")


@dataclass
class Grid:
    """What to run. Lengths are in tokens; depths in [0, 1]."""
    methods: list[Method]
    lengths: list[int] = field(default_factory=lambda: [4096, 8192, 12288, 16384, 24576, 32768])
    depths: list[float] = field(default_factory=lambda: [i / 9 for i in range(10)])
    keys: int = 2                                   # random keys per passkey cell
    key_digits: list[int] = field(default_factory=lambda: [5, 20, 50, 100])  # keylength experiment
    keylength_length: int = 12288
    ppl_sequences: int = 1                          # essay sequences per perplexity length
    ablation_length: int = 16384
    ablation_groups: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    ablation_windows: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096])
    ruler_tasks: list[str] = field(default_factory=lambda: list(RULER_TASKS))
    haystacks: int = 1                              # ruler: haystacks per task and length
    questions: int = 10                             # ruler: needle sets (questions) per haystack, where the task allows
    seed: int = 0


def trials(experiment: str, grid: Grid) -> list[dict]:
    """Every trial of ``experiment``, inputs outermost so methods of one input run together."""
    rng = random.Random(grid.seed)
    out = []
    if experiment == "passkey":
        for length in grid.lengths:
            for depth in grid.depths:
                for k in range(grid.keys):
                    key = prompts.random_key(rng, 5)
                    out += [dict(experiment=experiment, method=m.spec, length=length, depth=round(depth, 4),
                                 key=key) for m in grid.methods]
    elif experiment == "keylength":
        for digits in grid.key_digits:
            key = prompts.random_key(rng, digits)
            out += [dict(experiment=experiment, method=m.spec, length=grid.keylength_length, depth=0.5, key=key)
                    for m in grid.methods]
    elif experiment == "needle":
        for length in grid.lengths:
            for depth in grid.depths:
                out += [dict(experiment=experiment, method=m.spec, length=length, depth=round(depth, 4))
                        for m in grid.methods]
    elif experiment == "perplexity":
        for length in grid.lengths:
            for seq in range(grid.ppl_sequences):
                out += [dict(experiment=experiment, method=m.spec, length=length, sequence=seq)
                        for m in grid.methods]
    elif experiment == "ruler":
        out = ruler_trials(grid.methods, grid.lengths, grid.ruler_tasks, grid.haystacks, grid.questions, grid.seed)
    elif experiment == "ablation":
        for w in grid.ablation_windows:
            for g in grid.ablation_groups:
                out.append(dict(experiment=experiment, method=f"selfextend:{g}:{w}", length=grid.ablation_length,
                                group_size=g, window=w, sequence=0))
    else:
        raise ValueError(f"unknown experiment {experiment!r}; choose from {', '.join(EXPERIMENTS)}")
    return out


# what a record of each experiment holds: its trial's fields, and the number the report reads
TRIAL_FIELDS = {"passkey": ("method", "length", "depth", "key"), "keylength": ("method", "length", "depth", "key"),
                "needle": ("method", "length", "depth"), "perplexity": ("method", "length", "sequence"),
                "ablation": ("method", "length", "group_size", "window", "sequence"),
                "ruler": ("method", "length", "task", "haystack", "sets", "question", "seed")}
RESULT_FIELD = {"passkey": "score", "keylength": "score", "needle": "score", "perplexity": "ppl", "ablation": "ppl",
                "ruler": "score"}


def trial_key(trial: dict) -> str:
    return json.dumps(trial, sort_keys=True)


def record_problem(record) -> str | None:
    """Why ``record`` (one parsed line of results.jsonl) is not a finished trial, or None if it is."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    trial = record.get("trial")
    if not isinstance(trial, dict):
        return 'no "trial" object'
    experiment = trial.get("experiment")
    if experiment not in EXPERIMENTS:
        return f"unknown experiment {experiment!r}"
    missing = [f for f in TRIAL_FIELDS[experiment] if f not in trial]
    if missing:
        return f"the trial has no {', '.join(missing)}"
    result = record.get(RESULT_FIELD[experiment])
    if isinstance(result, bool) or not isinstance(result, (int, float)):
        return f"no number {RESULT_FIELD[experiment]!r}"
    try:
        parse_method(str(trial["method"]))
    except ValueError as e:
        return str(e)
    return None


def _warn(message: str) -> None:
    tqdm.write(f"selfextend: warning: {message}", file=sys.stderr)


def load_results(path: Path) -> dict[str, dict]:
    """key -> record of every finished trial in the JSONL file, in file order (a later record of the
    same trial wins). A line that is not a finished trial is skipped with a warning naming its line
    number; the file is never changed here."""
    done = {}
    if not path.exists():
        return done
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problem = record_problem(record)
        except json.JSONDecodeError as e:
            problem = f"not valid JSON ({e.msg} at column {e.colno})"
        if problem:
            _warn(f"{path} line {number} skipped: {problem}. The line stays in the file; a trial recorded "
                  "only there counts as not done, so a run of it runs again and appends a new record")
            continue
        done[trial_key(record["trial"])] = record
    return done


def _end_last_line(path: Path) -> None:
    """Before appending: a last line without its newline is either a complete record (the newline is
    added) or a record cut short by an interrupted write (it is dropped, with a warning)."""
    data = path.read_bytes() if path.exists() else b""
    if not data or data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    try:
        complete = record_problem(json.loads(data[start:])) is None
    except (json.JSONDecodeError, UnicodeDecodeError):
        complete = False
    if complete:
        path.write_bytes(data + b"\n")
    else:
        number = data[:start].count(b"\n") + 1
        _warn(f"{path} line {number} dropped: a record cut short by an interrupted write")
        path.write_bytes(data[:start])


class FolderBusy(Exception):
    """Another live process holds the lock of a results folder; the message names its pid."""


class FolderLock:
    """An exclusive lock on a results folder: ``fcntl.flock`` on ``FOLDER/.selfextend.lock``, which
    holds the pid of the process that has it. The kernel drops the lock when that process ends, however
    it ends, so a lock file left by a killed run never blocks the next one (it takes the file over).

        with FolderLock(out):   # FolderBusy if another live process has it
            ...

    Release removes the file while still holding the lock; a process that opened the old file just
    before finds, once it has the lock, that the name is no longer its file, and tries again."""

    NAME = ".selfextend.lock"

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / self.NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock (creating the folder) or raise :class:`FolderBusy`; never waits."""
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                raise FolderBusy(f"{self.folder} is in use by another run (pid {holder or 'unknown'}, lock file "
                                 f"{self.path}); wait for it to finish, or choose another --out") from None
            if self._names(fd):
                break
            os.close(fd)  # locked a file its holder removed on release: open the name again
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def _names(self, fd: int) -> bool:
        """Whether ``self.path`` still names the file open as ``fd``."""
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):  # removed by hand meanwhile
                os.unlink(self.path)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


COMMANDS = "commands.txt"  # the commands that produced a results folder, in order


def record_command(out: Path, command: str | None) -> None:
    """Add ``command`` to ``OUT/commands.txt`` (the commands that produced the results, in order) unless
    it is already there: a resumed run is the same command."""
    path = Path(out) / COMMANDS
    if command and command not in (path.read_text().splitlines() if path.exists() else []):
        with path.open("a") as f:
            f.write(command + "\n")


PPL_STRIDE = 40_000  # perplexity sequence i starts at token i * PPL_STRIDE of the essays


class Inputs:
    """The input of each trial, from the tokenizer alone: a prompt (passkey, keylength, needle) or the
    token ids to score (perplexity, ablation). ``check`` builds every input of a run before any model
    runs, so a length an experiment cannot build is refused up front."""

    def __init__(self, tokenizer, haystack: list[int] | None = None):
        self.tokenizer = tokenizer
        self._haystack = haystack  # token ids of the essays; None = tokenize them on first use

    @property
    def haystack(self) -> list[int]:
        if self._haystack is None:
            from ..assets import essay_text

            self._haystack = self.tokenizer(essay_text(), add_special_tokens=False)["input_ids"]
        return self._haystack

    def build(self, trial: dict) -> prompts.Prompt | list[int]:
        """The prompt or token ids of ``trial``; ValueError if the experiment cannot build that length."""
        exp, length = trial["experiment"], trial["length"]
        if exp in ("passkey", "keylength"):
            return prompts.passkey_prompt(self.tokenizer, length, trial["depth"], trial["key"])
        if exp == "needle":
            return prompts.needle_prompt(self.tokenizer, self.haystack, length, trial["depth"])
        if length < 2:
            raise ValueError(f"a perplexity sequence needs at least 2 tokens, got {length}")
        start = trial["sequence"] * PPL_STRIDE
        ids = self.haystack[start:start + length]
        if len(ids) < length:
            raise ValueError(f"the essay corpus has too few tokens ({len(self.haystack)}) for a sequence of "
                             f"{length} tokens from token {start}")
        return ids

    def check(self, todo: list[dict]) -> None:
        """Build the input of every trial (each distinct input once); ValueError names the first bad one."""
        seen = set()
        for trial in todo:
            key = trial_key({k: v for k, v in trial.items() if k != "method"})
            if key not in seen:
                seen.add(key)
                try:
                    self.build(trial)
                except ValueError as e:
                    raise ValueError(f"{trial['experiment']} at length {trial['length']}: {e}") from None


class Runner:
    """Runs trials on one model, appending a JSON line per finished trial to ``results.jsonl``.

    A trial that computes exactly what a finished one computed (the same input and the same
    ``methods.computation``: a rule that has not started grouping and the plain model, or two spellings
    of one fixed G and w) is not run again: its record copies that result, with ``"seconds": 0`` and
    ``"same_as"`` naming the method that was run."""

    def __init__(self, model, tokenizer, out_dir: Path, max_new_tokens: int = 12, inputs: Inputs | None = None):
        from ..assets import trained_length

        self.model, self.tokenizer = model, tokenizer
        self.inputs = inputs or Inputs(tokenizer)
        self.path = Path(out_dir) / "results.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_new_tokens = max_new_tokens
        self.pretrained_length = trained_length(model)
        _end_last_line(self.path)
        self.done = load_results(self.path)  # key -> record; kept up to date as trials finish
        self.computed = {}  # same_computation key -> a record that ran it
        for record in self.done.values():
            self._remember(record)

    def same_computation(self, trial: dict) -> str | None:
        """A key shared by the trials that compute exactly the same thing, or None if only this trial's
        method computes it (its settings are not fixed for the whole input)."""
        # a generating trial decodes at most max_new_tokens + len(answer) // 2 tokens (run_one); answers
        # are at most 100 digits, so 64 more positions bound every one of them
        generated = self.max_new_tokens + 64 if RESULT_FIELD[trial["experiment"]] == "score" else 0
        if trial["experiment"] == "ruler":
            generated = max(spec.new_tokens for spec in RULER_TASKS.values())
        try:
            computed = computation(parse_method(trial["method"]), self.pretrained_length, trial["length"], generated)
        except ValueError:  # a rule this model cannot run (a record from another model): nothing is shared
            return None
        if computed is None:
            return None
        return trial_key({**{k: v for k, v in trial.items() if k != "method"}, "computed_with": list(computed)})

    def _remember(self, record: dict) -> None:
        key = self.same_computation(record["trial"])
        if key is not None and "same_as" not in record:
            self.computed.setdefault(key, record)

    def _finished(self, trial: dict) -> dict:
        """The record of ``trial``: copied from an equal computation if there is one, else run now."""
        copy = self.copied(trial)
        if copy is not None:
            return copy
        t0 = time.perf_counter()
        result = self.run_one(trial)
        return {"trial": trial, **result, "seconds": round(time.perf_counter() - t0, 2)}

    @property
    def records(self) -> list[dict]:
        return list(self.done.values())

    @staticmethod
    def key(trial: dict) -> str:
        return trial_key(trial)

    def copied(self, trial: dict) -> dict | None:
        """The record of ``trial`` copied from a finished trial that computed exactly the same, or None."""
        earlier = self.computed.get(self.same_computation(trial))
        if earlier is None:
            return None
        settings = recorded_settings(parse_method(trial["method"]), self.pretrained_length, trial["length"])
        return {**earlier, "trial": trial, "settings": settings, "seconds": 0.0, "same_as": earlier["trial"]["method"]}

    def append(self, record: dict) -> None:
        """Write a finished trial's record to results.jsonl and remember it."""
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.done[trial_key(record["trial"])] = record
        self._remember(record)

    def run(self, todo: list[dict], ruler_inputs: HaystackInputs | None = None) -> None:
        if todo and todo[0]["experiment"] == "ruler":
            run_ruler(self, todo, ruler_inputs)
            return
        remaining = [t for t in todo if trial_key(t) not in self.done]
        if len(remaining) < len(todo):
            tqdm.write(f"{len(todo) - len(remaining)} of {len(todo)} trials already in {self.path}; skipping them",
                       file=sys.stderr)
        with tqdm(remaining, desc="trials", unit="trial") as bar:
            for trial in bar:
                bar.set_postfix_str(f"{trial['experiment']} {trial['method']} {trial['length']}")
                self.append(self._finished(trial))

    def run_one(self, trial: dict) -> dict:
        inputs = self.inputs.build(trial)
        with applied(self.model, parse_method(trial["method"]), trial["length"]) as settings:
            if isinstance(inputs, prompts.Prompt):
                gen = generate(self.model, self.tokenizer, inputs.input_ids,
                               self.max_new_tokens + len(inputs.answer) // 2, progress=False)
                score = (prompts.needle_score(gen.text) if trial["experiment"] == "needle"
                         else float(prompts.passkey_correct(gen.text, trial["key"])))
                return {"settings": settings, "answer": gen.text, "score": score}
            nll = log_likelihoods(self.model, torch.tensor(inputs))
            return {"settings": settings, "ppl": float(nll.mean().exp()),
                    "ppl_last_quarter": float(nll[-len(nll) // 4:].mean().exp())}
