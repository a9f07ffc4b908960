"""`selfextend passkey`: a passkey hidden in a long prompt, answered by the plain model and by the
same model with SelfExtend, side by side.

The prompt is the Landmark-attention passkey prompt used by the SelfExtend paper, built to
``--length`` tokens of the model's tokenizer with a random 5-digit key at ``--depth``.
"""

from __future__ import annotations

import argparse
import random

from .common import (CommandError, add_model_arguments, bad_input, enable_from_args, positive_int,
                     settings_from_args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--length", type=positive_int, default=16000,
                        help="prompt length in tokens (default 16000, about twice the bundled model's 8192)")
    parser.add_argument("--depth", type=float, default=0.5, help="where the key sits, 0 = start, 1 = end (default 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random key (default 0)")
    parser.add_argument("--key", default=None, help="the passkey itself (default: 5 random digits from --seed)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=12)
    parser.add_argument("--skip-plain", action="store_true", help="run only the SelfExtend model")


def run(args) -> int:
    from .. import prompts
    from ..assets import load_config, load_model, load_tokenizer, trained_length
    from ..generation import generate

    # every check (depth, key, settings, prompt length) before the weights load
    if not 0.0 <= args.depth <= 1.0:
        raise CommandError(f"--depth must be in [0, 1], got {args.depth}")
    key = args.key or prompts.random_key(random.Random(args.seed))
    if not key.isdigit():
        raise CommandError(f"--key must be digits, got {key!r}")
    config = load_config(args.model)
    settings = settings_from_args(args, config)
    tokenizer = load_tokenizer(args.model)
    with bad_input():
        prompt = prompts.passkey_prompt(tokenizer, args.length, args.depth, key)
    n, trained = len(prompt.input_ids), trained_length(config)
    model, _ = load_model(args.model, tokenizer=tokenizer)
    print(f"model {args.model}: trained length {trained}; prompt {n} tokens ({n / trained:.2f}x), "
          f"passkey {key} at depth {args.depth:g} (token {prompt.fact_token})", flush=True)

    rows = []
    if not args.skip_plain:
        result = generate(model, tokenizer, prompt.input_ids, args.max_new_tokens, desc="plain model",
                          chunk_size=args.chunk_size)
        rows.append(("plain", "-", result))
        print(f"  plain      -> {result.text.strip()!r}", flush=True)
    handle = enable_from_args(model, args)
    handle.warn_if_too_long(n)
    label = settings.describe(n)
    result = generate(model, tokenizer, prompt.input_ids, args.max_new_tokens, desc="SelfExtend",
                      chunk_size=args.chunk_size)
    handle.disable()
    rows.append(("selfextend", label, result))
    print(f"  selfextend -> {result.text.strip()!r}", flush=True)

    print()
    print("| method | settings | answer | correct | prefill s |")
    print("|---|---|---|---|---|")
    for name, settings, r in rows:
        ok = "yes" if prompts.passkey_correct(r.text, key) else "no"
        print(f"| {name} | {settings} | {r.text.strip()!r} | {ok} | {r.prefill_seconds:.1f} |")
    return 0
