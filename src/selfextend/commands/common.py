"""Arguments, checks and errors shared by the subcommands.

A command refuses bad input by raising :class:`CommandError` (or letting an ``AssetError`` through);
``selfextend.cli.main`` prints its message as one line on stderr and exits with status 2. Every check
runs before the command loads weights or computes anything.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..assets import DEFAULT_MODEL, load_model


class CommandError(Exception):
    """Bad input to a command; the message says what to change (printed as one line, exit status 2)."""


@contextmanager
def bad_input():
    """Inside the block, a ValueError (how the library refuses a bad setting, method or length) is the
    user's bad input: it becomes a CommandError with the same message."""
    try:
        yield
    except ValueError as e:
        raise CommandError(str(e)) from None


# -- argument types --------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of positive integers, e.g. ``4096,8192``."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (``nan``, ``inf`` and negative numbers are refused)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def depth_list(text: str) -> list[float]:
    """Comma-separated depths in [0, 1], e.g. ``0.2,0.5,0.8``."""
    try:
        values = [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"depths must be in [0, 1], got {text!r}")
    return values


# -- arguments every command shares ----------------------------------------------------------------
def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"local Hugging Face folder, .gguf file, or built-in name (default {DEFAULT_MODEL})")


def add_selfextend_arguments(parser: argparse.ArgumentParser) -> None:
    """SelfExtend's settings, the same on every command: -G/--group-size, --rule, -w/--window, --mode."""
    from ..positions import DEFAULT_RULE

    parser.add_argument("--group-size", "-G", type=positive_int, default=None,
                        help="SelfExtend group size G (default: chosen by --rule from the input length)")
    parser.add_argument("--rule", default=None,
                        help=f"how G is chosen when -G is not given: 'f=F' keeps grouped distances below F x "
                        f"the trained length, 'cover' is the paper's rule (default {DEFAULT_RULE}; "
                        "`selfextend calibrate` recommends one for a model)")
    parser.add_argument("--window", "-w", type=positive_int, default=None,
                        help="neighbor window w (default: the rule's, trained length // 4 for cover, // 8 for f=F)")
    parser.add_argument("--mode", choices=("floor", "rerope", "leaky"), default="floor",
                        help="floor = SelfExtend (default); rerope = G infinite; leaky = no floor")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, SelfExtend's settings and --chunk-size: what commands that run one input take."""
    add_model_argument(parser)
    add_selfextend_arguments(parser)
    parser.add_argument("--chunk-size", type=positive_int, default=None,
                        help="prefill in chunks of this many tokens (default: one pass)")


# -- checks and set-up -----------------------------------------------------------------------------
def settings_from_args(args, config):
    """The ``selfextend.Settings`` that -G/-w/--mode ask for on a model with ``config`` (no weights
    needed), or CommandError saying what is out of range."""
    from ..settings import Settings

    with bad_input():
        return Settings.from_config(config, group_size=args.group_size, window=args.window, mode=args.mode,
                                    rule=args.rule)


def enable_from_args(model, args):
    """Switch SelfExtend on with the command's settings; a bad setting is a CommandError (check it
    before loading the model with settings_from_args)."""
    import selfextend

    with bad_input():
        return selfextend.enable(model, group_size=args.group_size, window=args.window, mode=args.mode,
                                 rule=args.rule)


def load_or_exit(spec: str):
    """(model, tokenizer); a model that cannot be found or loaded is a CommandError (one line, exit 2)."""
    from ..assets import AssetError

    try:
        return load_model(spec)
    except AssetError as e:
        raise CommandError(str(e)) from None


def check_output_folder(path: str | Path) -> None:
    """CommandError unless ``path`` (a command's ``--out``) is a folder this process may write in, or
    one it may create (its nearest existing parent is a writable folder); nothing is created. The
    commands write their results after loading weights or running cells: a folder they could not
    write is refused before that work."""
    path = Path(path)
    try:
        existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    except OSError as e:  # e.g. a parent that may not be searched
        raise CommandError(f"--out {path}: {e.strerror or e}; choose another folder") from None
    if not existing.is_dir():
        where = "it" if existing == path else str(existing)
        raise CommandError(f"--out {path}: {where} is not a folder; choose another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CommandError(f"--out {path}: {existing} is not writable; choose another folder")


@contextmanager
def results_lock(out: Path) -> Iterator[None]:
    """Hold the lock of the results folder ``out`` (created if needed) for the block; a folder another
    live run holds is a CommandError naming its pid."""
    from ..evaluation.experiments import FolderBusy, FolderLock

    lock = FolderLock(out)
    try:
        lock.acquire()
    except FolderBusy as e:
        raise CommandError(str(e)) from None
    try:
        yield
    finally:
        lock.release()


def read_text(path: str | None) -> str:
    """The text of a UTF-8 file, or of stdin for None or ``-``; a binary or non-UTF-8 input is a CommandError."""
    name = "stdin" if path in (None, "-") else path
    try:
        if path in (None, "-"):
            raw = getattr(sys.stdin, "buffer", sys.stdin).read()  # bytes from a real stdin, str from a StringIO
        else:
            raw = Path(path).read_bytes()
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except OSError as e:
        raise CommandError(f"cannot read {name}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise CommandError(f"{name} is not UTF-8 text (byte {e.start} is {raw[e.start:e.start + 1]!r}); "
                           "pass a text file") from None
    if "\x00" in text:
        raise CommandError(f"{name} looks like a binary file (it contains NUL bytes); pass a text file")
    return text
