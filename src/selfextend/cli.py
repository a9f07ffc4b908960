"""The `selfextend` command: one entry point, one module per subcommand.

Each subcommand is a module ``selfextend.commands.<name>`` with ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs, so ``selfextend --help``
stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import signal
import sys
import threading

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "passkey": ("selfextend.commands.passkey", "hide a passkey in a long prompt; plain model vs SelfExtend"),
    "generate": ("selfextend.commands.generate", "answer a prompt about a long document"),
    "bench": ("selfextend.commands.bench", "time and memory of SelfExtend vs plain attention"),
    "eval": ("selfextend.commands.eval", "the paper's evaluations with baselines side by side"),
    "calibrate": ("selfextend.commands.calibrate", "measure a model's retrieval; recommend G and w for a target length"),
    "serve": ("selfextend.commands.serve", "OpenAI-compatible HTTP server with SelfExtend"),
    "vllm-serve": ("selfextend.commands.vllm_serve", "vLLM's OpenAI server with SelfExtend (in .venv-vllm)"),
}


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage block) and exits with status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="selfextend", description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def command_parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of one subcommand (imports that subcommand's module)."""
    module = importlib.import_module(SUBCOMMANDS[name][0])
    parser = OneLineErrorParser(prog=f"selfextend {name}", description=SUBCOMMANDS[name][1],
                                allow_abbrev=False)  # no "--mode" taken as "--model"
    module.add_arguments(parser)
    parser.set_defaults(run=module.run)
    return parser


INTERRUPTED = 130  # the shell's status for a command stopped by Ctrl-C (128 + SIGINT)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Bad input (a CommandError or AssetError) is one line on stderr and status 2;
    Ctrl-C, whenever it comes, is one line and status 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0
    name, rest = argv[0], argv[1:]
    prog = f"selfextend {name}" if name in SUBCOMMANDS else "selfextend"
    if threading.current_thread() is threading.main_thread():
        # a job started by `nohup` or in the background of a script inherits SIGINT ignored, and Python
        # then installs no handler: take Ctrl-C (kill -INT) back, so it stops the command as in a terminal
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return _run(name, rest, prog)
    except KeyboardInterrupt:  # the command's own `finally` blocks and context managers have run
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED


def _run(name: str, rest: list[str], prog: str) -> int:
    from .assets import AssetError
    from .commands.common import CommandError

    try:
        if name not in SUBCOMMANDS:
            raise CommandError(f"unknown command {name!r}; choose from {', '.join(SUBCOMMANDS)}")
        args = command_parser(name).parse_args(rest)
        args.command_line = shlex.join(["selfextend", name, *rest])  # as typed: recorded next to results
        return int(args.run(args) or 0)
    except (CommandError, AssetError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # argparse errors and commands that stop early: report the status
        return e.code if isinstance(e.code, int) else 1


if __name__ == "__main__":
    sys.exit(main())
