"""`selfextend serve`: an OpenAI-compatible HTTP server for a model with SelfExtend switched on.

    selfextend serve --model smollm2-135m --port 8000 [-G G] [-w W] [--mode M] [--max-input-tokens N]
                     [--max-output-tokens N]

The settings and limits are checked from the model's config before any weights load; the app and its
limits are :mod:`selfextend.serve.app`.
"""

from __future__ import annotations

import argparse
import sys

from ..serve.app import check_max_input_tokens, check_max_output_tokens, create_app, serve
from ..serve.engine import DEFAULT_MAX_QUEUE
from ..settings import Settings
from .common import (add_model_argument, add_selfextend_arguments, bad_input, enable_from_args, load_or_exit,
                     positive_int, settings_from_args)


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1..65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number (1-65535), got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number (1-65535), got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    add_selfextend_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=port_number, default=8000, help="port to listen on (default: %(default)s)")
    parser.add_argument("--max-input-tokens", type=positive_int, default=None,
                        help="longest prompt accepted, in tokens (default: 4 x the trained length, at most "
                             "SelfExtend's extended limit); longer prompts get a 400")
    parser.add_argument("--max-output-tokens", type=positive_int, default=None,
                        help="most new tokens per request, and chat's default max_tokens (default: a quarter of "
                             "the trained length, 2048 for a model trained on 8192); asking for more gets a 400")
    parser.add_argument("--max-queue", type=positive_int, default=DEFAULT_MAX_QUEUE,
                        help="requests that may wait for the model; more are answered 503 (default: %(default)s)")
    parser.add_argument("--served-name", default=None,
                        help="model id clients send in requests (default: the model's short name)")


def check_settings(args: argparse.Namespace) -> Settings:
    """SelfExtend's settings from the model's config alone, checked before any weights load: a bad
    setting or a --max-input-tokens or --max-output-tokens above the extended limit is a CommandError
    (one line, status 2)."""
    from ..assets import load_config

    settings = settings_from_args(args, load_config(args.model))
    with bad_input():
        if args.max_input_tokens is not None:
            check_max_input_tokens(settings, args.max_input_tokens)
        if args.max_output_tokens is not None:
            check_max_output_tokens(settings, args.max_output_tokens)
    return settings


def run(args: argparse.Namespace) -> int:
    from ..assets import model_name

    check_settings(args)
    model, tokenizer = load_or_exit(args.model)
    handle = enable_from_args(model, args)
    name = args.served_name or model_name(args.model)
    app = create_app(model, tokenizer, name, handle, max_queue=args.max_queue, max_input_tokens=args.max_input_tokens,
                     max_output_tokens=args.max_output_tokens)
    service = app.state.service
    print(f"[selfextend] serving {name!r} at http://{args.host}:{args.port}/v1 ({handle.describe()}; "
          f"prompts up to {service.max_input_tokens} tokens, answers up to {service.max_output_tokens} tokens)",
          file=sys.stderr, flush=True)
    serve(app, args.host, args.port)
    return 0
