"""`selfextend generate`: answer a prompt about a long document, with SelfExtend on.

The document comes from ``--file`` or stdin, the question from ``--prompt``; for a chat model the
two form one user turn of its chat template. The answer streams to stdout; lengths, the chosen G
and w, and prefill/decode speed go to stderr.
"""

from __future__ import annotations

import argparse
import sys

from .common import add_model_arguments, enable_from_args, load_or_exit, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", "-p", required=True, help="the question or instruction")
    parser.add_argument("--file", "-f", type=argparse.FileType("r", encoding="utf-8"), default=None,
                        help="the long document (default: read stdin; '-' also means stdin)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    parser.add_argument("--plain", action="store_true", help="run the plain model (SelfExtend off), to compare")
    parser.add_argument("--limit", choices=("warn", "refuse"), default="refuse",
                        help="an input beyond SelfExtend's extended limit: refuse (default) or warn and go on")


def run(args) -> int:
    from transformers import TextStreamer

    from .. import ContextLengthError
    from ..runtime import chat_or_plain_ids, generate

    if args.temperature < 0:
        print(f"selfextend: error: --temperature must be >= 0, got {args.temperature}", file=sys.stderr)
        return 2
    source = args.file or sys.stdin
    document = source.read()
    model, tokenizer = load_or_exit(args.model)
    text = f"{document.strip()}\n\n{args.prompt}" if document.strip() else args.prompt
    ids = chat_or_plain_ids(tokenizer, text, chat=False if args.no_chat else None)
    n, trained = len(ids), model.config.get_text_config().max_position_embeddings
    if args.plain:
        settings = "plain model"
    else:
        handle = enable_from_args(model, args)
        try:
            handle.raise_if_too_long(n)
        except ContextLengthError as e:
            if args.limit == "refuse":
                print(f"selfextend: error: {e}", file=sys.stderr)
                return 2
            print(f"selfextend: warning: {e}", file=sys.stderr)
        settings = handle.describe(n)
    print(f"[input {n} tokens, trained length {trained} ({n / trained:.2f}x); {settings}]", file=sys.stderr, flush=True)

    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = generate(model, tokenizer, ids, args.max_new_tokens, streamer=streamer, chunk_size=args.chunk_size,
                      **sampling)
    print(f"[prefill {result.prompt_tokens} tokens in {result.prefill_seconds:.1f} s "
          f"({result.prefill_tokens_per_second:.0f} tok/s); decode {result.new_tokens} tokens in "
          f"{result.decode_seconds:.1f} s ({result.decode_tokens_per_second:.1f} tok/s)]", file=sys.stderr)
    return 0
