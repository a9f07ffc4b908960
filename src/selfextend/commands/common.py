"""Arguments and set-up shared by the subcommands that load a model and switch SelfExtend on."""

from __future__ import annotations

import argparse
import sys

from ..assets import DEFAULT_MODEL, AssetError, load_model


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"local Hugging Face folder, .gguf file, or built-in name (default {DEFAULT_MODEL})")


def add_selfextend_arguments(parser: argparse.ArgumentParser) -> None:
    """SelfExtend's settings, the same on every command: -G/--group-size, -w/--window, --mode."""
    parser.add_argument("--group-size", "-G", type=positive_int, default=None,
                        help="SelfExtend group size G (default: the smallest G that covers the input)")
    parser.add_argument("--window", "-w", type=positive_int, default=None,
                        help="neighbor window w (default: trained length // 4)")
    parser.add_argument("--mode", choices=("floor", "rerope", "leaky"), default="floor",
                        help="floor = SelfExtend (default); rerope = G infinite; leaky = no floor")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, SelfExtend's settings and --chunk-size: what commands that run one input take."""
    add_model_argument(parser)
    add_selfextend_arguments(parser)
    parser.add_argument("--chunk-size", type=positive_int, default=None,
                        help="prefill in chunks of this many tokens (default: one pass)")


def load_or_exit(spec: str):
    """(model, tokenizer), or print the reason and exit with status 2."""
    try:
        return load_model(spec)
    except AssetError as e:
        print(f"selfextend: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def enable_from_args(model, args):
    """Switch SelfExtend on with the command's settings; a bad setting exits with status 2."""
    import selfextend

    try:
        return selfextend.enable(model, group_size=args.group_size, window=args.window, mode=args.mode)
    except ValueError as e:
        print(f"selfextend: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
