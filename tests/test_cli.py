"""selfextend.cli: one entry point whose subcommands share the same SelfExtend options."""

from __future__ import annotations

import pytest

from selfextend.cli import main
from tiny_fixtures import error_lines, tiny  # noqa: F401  (fixtures)


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
