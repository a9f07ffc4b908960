"""selfextend.cli: one entry point whose subcommands share the same SelfExtend options, report bad input
and Ctrl-C in one line, and refuse an output folder they could not write before any work."""

from __future__ import annotations

import pytest

from selfextend.cli import SUBCOMMANDS, main
from tiny_fixtures import error_lines


@pytest.mark.parametrize("command, required", [
    ("passkey", []), ("generate", ["-p", "q"]), ("bench", []), ("eval", []),
])
def test_every_command_takes_the_same_selfextend_options(command, required):
    from selfextend.cli import command_parser

    args = command_parser(command).parse_args([*required, "-G", "4", "-w", "16", "--mode", "leaky"])
    assert (args.group_size, args.window, args.mode) == (4, 16, "leaky")
    args = command_parser(command).parse_args([*required, "--group-size", "2", "--window", "8"])
    assert (args.group_size, args.window) == (2, 8)


@pytest.mark.parametrize("argv, message", [
    (["generate", "-p", "q", "-G", "1.5"], "selfextend generate: error: argument --group-size/-G: expected a positive integer"),
    (["eval", "--lengths", "4096,x"], "selfextend eval: error: argument --lengths: expected comma-separated integers"),
    (["bench", "--no-such-option"], "selfextend bench: error: unrecognized arguments: --no-such-option"),
    (["passkey", "--mod", "x"], "selfextend passkey: error: unrecognized arguments: --mod"),  # no abbreviations
    (["frobnicate"], "selfextend: error: unknown command 'frobnicate'"),
])
def test_a_bad_argument_is_one_line_and_status_2(tiny, capsys, argv, message):
    assert main([*argv, "--model", str(tiny)] if argv[0] != "frobnicate" else argv) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(message), err


# ------------------------------------------------------------------------------------------------
# Ctrl-C: one line, status 130, whatever the command was doing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_ctrl_c_in_any_command_is_one_line_and_status_130(command, monkeypatch, capsys):
    import importlib

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(SUBCOMMANDS[command][0]), "run", interrupted)
    try:
        status = main([command, *(["-p", "q"] if command == "generate" else [])])
    except KeyboardInterrupt:  # (it used to escape: a traceback)
        pytest.fail("KeyboardInterrupt escaped selfextend.cli.main")
    assert status == 130
    assert error_lines(capsys.readouterr().err) == [f"selfextend {command}: interrupted"]


HOLD_IN_PREFILL = """
import signal, sys, time
from pathlib import Path

import selfextend.assets as assets
from selfextend.generation import decoder_layers

started, load = Path(sys.argv[1]), assets.load_model


def load_model(*args, **kwargs):
    model, tokenizer = load(*args, **kwargs)

    def hold(_layer, _args):  # the first decoder layer of the prefill says so, then waits
        started.write_text("prefill")
        time.sleep(300)

    decoder_layers(model)[0].register_forward_pre_hook(hold)
    return model, tokenizer


assets.load_model = load_model
from selfextend.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_ctrl_c_during_a_generation_exits_130_without_a_traceback(tiny, tmp_path):
    """It used to print a KeyboardInterrupt traceback (and die of the signal). The child starts with
    SIGINT ignored, as a job that `nohup` or a non-interactive shell starts in the background inherits
    it (Python then installs no KeyboardInterrupt handler): the command takes Ctrl-C back itself."""
    import signal
    import subprocess
    import sys
    import time

    started, doc = tmp_path / "started", tmp_path / "doc.txt"
    doc.write_text("The grass is green. " * 20)
    proc = subprocess.Popen([sys.executable, "-c", HOLD_IN_PREFILL, str(started), "generate", "--model", str(tiny),
                             "-f", str(doc), "-p", "What color?"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and error_lines(err)[-1].strip() == "selfextend generate: interrupted", err


# ------------------------------------------------------------------------------------------------
# an output folder that cannot be written: refused before any work
# ------------------------------------------------------------------------------------------------

WRITERS = {  # command -> arguments that would run it quickly on the tiny checkpoint
    "eval": ["passkey", "--methods", "plain", "--lengths", "300", "--depths", "0.5", "--keys", "1"],
    "bench": ["--lengths", "96", "--methods", "plain", "--decode-tokens", "1"],
    "calibrate": ["--lengths", "160", "--target-length", "400", "--ppl-length", "128"],
}


@pytest.mark.parametrize("command", list(WRITERS))
@pytest.mark.parametrize("where", ["under /dev/null", "under a file", "a file"])
def test_an_output_folder_that_cannot_be_made_is_refused_before_any_work(tiny, tmp_path, capsys, monkeypatch,
                                                                         essays, command, where):
    """`--out /dev/null/x` used to end in a NotADirectoryError traceback (bench: after every cell ran)."""
    import selfextend.assets
    import selfextend.commands.bench

    monkeypatch.setattr(selfextend.assets, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    monkeypatch.setattr(selfextend.commands.bench, "_measure", lambda *a, **k: pytest.fail("a cell ran"))
    (tmp_path / "file").write_text("x")
    out, blocker = {"under /dev/null": ("/dev/null/x", "/dev/null"), "under a file": (tmp_path / "file" / "x",
                                                                                     tmp_path / "file"),
                    "a file": (tmp_path / "file", "it")}[where]
    assert main([command, *WRITERS[command], "--model", str(tiny), "--out", str(out)]) == 2
    err = error_lines(capsys.readouterr().err)
    assert err == [f"selfextend {command}: error: --out {out}: {blocker} is not a folder; choose another folder"]


# ------------------------------------------------------------------------------------------------
# layout: every command in selfextend.commands; the libraries never import it
# ------------------------------------------------------------------------------------------------


def test_every_subcommand_lives_in_commands():
    assert all(module == f"selfextend.commands.{name.replace('-', '_')}" for name, (module, _) in SUBCOMMANDS.items())


NOT_YET = {"vllm/bench.py"}  # its own `python -m selfextend.vllm.bench` command line, to be rewritten


def test_no_library_imports_the_commands():
    """Commands import libraries, never the reverse: outside cli.py and commands/, no module of the
    package imports selfextend.commands (serve, evaluation, vllm and bench used to import its argparse
    helpers)."""
    import ast
    from pathlib import Path

    import selfextend

    root = Path(selfextend.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if relative.parts[0] == "commands" or relative.as_posix() in {"cli.py", *NOT_YET}:
            continue
        package = ["selfextend", *relative.parts[:-1]]  # where relative imports start from
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                modules = [".".join([*base, *([node.module] if node.module else [])])]
                modules += [f"{modules[0]}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            if any(m == "selfextend.commands" or m.startswith("selfextend.commands.") for m in modules):
                offenders.append(f"{relative}:{node.lineno}")
    assert offenders == []
