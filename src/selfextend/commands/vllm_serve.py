"""`selfextend vllm-serve`: vLLM's OpenAI-compatible server with SelfExtend switched on.

    selfextend vllm-serve --model smollm2-135m -G 4 -w 1024 -- --port 8000 --dtype float32

works out the settings exactly as ``selfextend.vllm.engine_args`` does, checks the options after
``--`` (parsed with vLLM's own ``vllm serve`` parser), refusing what SelfExtend cannot serve with one
line before vLLM starts, then runs

    vllm serve FOLDER --max-model-len N --hf-overrides '{"selfextend": {...}, ...}' OPTIONS

with the options after ``--`` passed on unchanged, except ``--hf-overrides``, merged into SelfExtend's.
``--print-command`` prints that command instead of running it, for use with plain ``vllm serve``
(with this package installed the settings in it switch SelfExtend on; see ``selfextend.vllm.plugin``).
vLLM runs in this process through ``selfextend.vllm.serve.vllm_main``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import sys

from .common import add_model_argument, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--group-size", "-G", type=positive_int, default=None,
                        help="SelfExtend group size G (1 to 64), fixed for the server (default: the G that --rule "
                             "picks for --max-model-len)")
    parser.add_argument("--rule", default=None,
                        help="how G is chosen when -G is not given: cover (the paper's, the default) or f=F")
    parser.add_argument("--window", "-w", type=positive_int, default=None,
                        help="neighbor window w (default: the rule's, trained length // 4 for cover)")
    parser.add_argument("--max-model-len", type=positive_int, default=None,
                        help="longest request, prompt + output (default and maximum: (L - w) * G + w)")
    parser.add_argument("--print-command", action="store_true",
                        help="print the vllm serve command line instead of running it")
    parser.add_argument("vllm_args", nargs="*", metavar="-- VLLM_OPTION",
                        help="options for vllm serve, after -- (e.g. -- --port 8000 --dtype float32); "
                             "--hf-overrides there are merged with SelfExtend's")


# engine options after -- that engine_args checks (EngineArgs field names = vllm serve's argument dests)
CHECKED_OPTIONS = ("kv_cache_dtype", "speculative_config", "kv_transfer_config", "decode_context_parallel_size",
                   "pipeline_parallel_size", "trust_remote_code", "attention_backend")


def serve_command(args) -> list[str]:
    """``vllm serve`` arguments (after the program name) that run SelfExtend with ``args``' settings.

    The options after ``--`` are parsed with vLLM's own ``vllm serve`` parser first: a model or
    ``--max-model-len`` there is refused (they are vllm-serve's own flags), ``--hf-overrides`` is
    merged into SelfExtend's (refusing its keys by name), and every engine option SelfExtend cannot
    serve is refused here, before vLLM starts (or any model file is read). The resulting command is
    parsed again to prove vLLM will see SelfExtend's settings."""
    from ..vllm import engine_args
    from ..vllm.serve import parse_vllm_args, without_hf_overrides

    settings = dict(group_size=args.group_size, window=args.window, max_model_len=args.max_model_len, rule=args.rule)
    engine_args(args.model, **settings)  # SelfExtend's own flags first, refused before vLLM's CLI is imported
    if any(re.match(r"--model(=|$)", word) for word in args.vllm_args):
        raise ValueError("--model is given after --; give the model as vllm-serve's --model, before --")
    user = parse_vllm_args([args.model, *args.vllm_args])  # a second model would be an unrecognized argument
    if user.max_model_len is not None:
        raise ValueError(f"--max-model-len {user.max_model_len} is given after --; give it before -- "
                         "(vllm-serve checks it against SelfExtend's limit)")
    options = {name: getattr(user, name) for name in CHECKED_OPTIONS if getattr(user, name, None) is not None}
    kwargs = engine_args(args.model, **settings, hf_overrides=user.hf_overrides or None, **options)
    command = ["serve", kwargs["model"], "--max-model-len", str(kwargs["max_model_len"]),
               "--hf-overrides", json.dumps(kwargs["hf_overrides"], separators=(",", ":")),
               *without_hf_overrides(args.vllm_args)]
    if "attention_backend" in kwargs and "attention_backend" not in options:  # CUDA: the backend SelfExtend replaces
        command += ["--attention-backend", str(kwargs["attention_backend"])]
    final = parse_vllm_args(command[1:])  # command[1] is the model
    if (final.model_tag, final.hf_overrides, final.max_model_len) != (kwargs["model"], kwargs["hf_overrides"],
                                                                     kwargs["max_model_len"]):
        raise ValueError("the options after -- change --hf-overrides or --max-model-len in a form vllm-serve cannot "
                         "merge (a --config file?); give overrides as one --hf-overrides JSON after --")
    return command


def run(args) -> int:
    from ..assets import AssetError

    if importlib.util.find_spec("vllm") is None:
        print("selfextend vllm-serve: error: vLLM is not installed in this environment; run "
              "bash scripts/setup-vllm.sh and use .venv-vllm/bin/selfextend", file=sys.stderr)
        return 2
    try:
        command = serve_command(args)
    except (ValueError, AssetError) as e:
        print(f"selfextend vllm-serve: error: {e}", file=sys.stderr)
        return 2
    if args.print_command:
        print(shlex.join(["vllm", *command]))
        return 0
    from ..vllm.plugin import SWITCH_ENV
    from ..vllm.serve import vllm_main

    os.environ[SWITCH_ENV] = "1"
    return vllm_main(command)
