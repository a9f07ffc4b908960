"""`selfextend generate`: answer a prompt about a long document, with SelfExtend on.

The document comes from ``--file`` or stdin, the question from ``--prompt``; for a chat model the
two form one user turn of its chat template. The answer streams to stdout; lengths, the chosen G
and w, and prefill/decode speed go to stderr.
"""

from __future__ import annotations

import argparse
import sys

from .common import (CommandError, add_model_arguments, enable_from_args, non_negative_float, positive_int,
                     read_text, settings_from_args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", "-p", required=True, help="the question or instruction")
    parser.add_argument("--file", "-f", default=None,
                        help="the long document, a UTF-8 text file (default: read stdin; '-' also means stdin)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128)
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    parser.add_argument("--plain", action="store_true", help="run the plain model (SelfExtend off), to compare")
    parser.add_argument("--limit", choices=("warn", "refuse"), default="refuse",
                        help="an input beyond SelfExtend's extended limit: refuse (default) or warn and go on")


def run(args) -> int:
    from .. import ContextLengthError
    from ..assets import load_config, load_model, load_tokenizer, trained_length
    from ..generation import encode_prompt, generate, make_sampler

    # every check (prompt, document, settings, length) before the weights load
    if not args.prompt.strip():
        raise CommandError("--prompt is empty; give the question or instruction, e.g. -p \"Summarize the text.\"")
    document = read_text(args.file)
    config = load_config(args.model)
    settings = None if args.plain else settings_from_args(args, config)
    tokenizer = load_tokenizer(args.model)
    text = f"{document.strip()}\n\n{args.prompt}" if document.strip() else args.prompt
    ids = encode_prompt(tokenizer, text, chat=False if args.no_chat else None)
    n, trained = len(ids), trained_length(config)
    if settings is not None:
        try:
            settings.raise_if_too_long(n)
        except ContextLengthError as e:
            if args.limit == "refuse":
                raise CommandError(str(e)) from None
            print(f"selfextend: warning: {e}", file=sys.stderr)
    model, _ = load_model(args.model, tokenizer=tokenizer)
    if settings is not None:
        enable_from_args(model, args)
    label = "plain model" if settings is None else settings.describe(n)
    print(f"[input {n} tokens, trained length {trained} ({n / trained:.2f}x); {label}]", file=sys.stderr, flush=True)

    result = generate(model, tokenizer, ids, args.max_new_tokens, make_sampler(args.temperature),
                      chunk_size=args.chunk_size, on_text=lambda text: print(text, end="", flush=True))
    print()
    print(f"[prefill {result.prompt_tokens} tokens in {result.prefill_seconds:.1f} s "
          f"({result.prefill_tokens_per_second:.0f} tok/s); decode {result.new_tokens} tokens in "
          f"{result.decode_seconds:.1f} s ({result.decode_tokens_per_second:.1f} tok/s)]", file=sys.stderr)
    return 0
