"""`selfextend serve` on the command line: the same --model / -G / -w / --mode as every command, and
bad options refused with exit status 2 and a one-line reason, before any weights load."""

from __future__ import annotations

import pytest

import selfextend.commands.common
import selfextend.commands.serve
from selfextend import cli
from selfextend.positions import DEFAULT_RULE, rule_window

W_DEFAULT = rule_window(DEFAULT_RULE, 64)  # the default window of the tiny model (L = 64)
LIMIT_G2 = (64 - W_DEFAULT) * 2 + W_DEFAULT  # extended limit with -G 2 and that window


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the command loads weights."""
    def load_model(spec, dtype=None):
        raise AssertionError(f"the model {spec} was loaded")

    monkeypatch.setattr(selfextend.commands.common, "load_model", load_model)


@pytest.fixture
def served(monkeypatch) -> list:
    """Capture the app `selfextend serve` would run, instead of running it."""
    apps = []
    monkeypatch.setattr(selfextend.commands.serve, "serve", lambda app, host, port: apps.append((app, host, port)))
    return apps


@pytest.mark.parametrize("port", ["99999", "0", "-1", "80.5", "http"])
def test_bad_port_exits_2(tiny, no_loading, capsys, port):
    assert cli.main(["serve", "--model", str(tiny), "--port", port]) == 2
    err = capsys.readouterr().err
    assert "argument --port: expected a port number (1-65535)" in err and port in err
    assert err.count("\n") == 1  # one line


@pytest.mark.parametrize("options, message", [
    (["-w", "64"], "window must be an integer with 1 <= window < pretrained length (64), got 64"),
    (["-G", "2", "--max-input-tokens", str(LIMIT_G2 + 1)],
     f"--max-input-tokens {LIMIT_G2 + 1} is above SelfExtend's extended limit of {LIMIT_G2}"),
    (["--mode", "rerope", "-G", "2"], "mode='rerope' uses an infinite group size"),
    (["-G", "2", "--max-output-tokens", str(LIMIT_G2 + 1)],
     f"--max-output-tokens {LIMIT_G2 + 1} is above SelfExtend's extended limit of {LIMIT_G2}"),
    (["--max-output-tokens", "0"], "argument --max-output-tokens: expected a positive integer"),
])
def test_bad_settings_exit_2_with_one_line_before_loading(tiny, no_loading, capsys, options, message):
    assert cli.main(["serve", "--model", str(tiny), *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfextend serve: error: ") and err.count("\n") == 1  # one line
    assert message in err


def test_serve_takes_the_shared_model_and_selfextend_options(tiny, served):
    argv = ["serve", "--model", str(tiny), "-G", "3", "-w", "8", "--mode", "leaky", "--max-input-tokens", "50",
            "--port", "8123", "--served-name", "mine"]
    assert cli.main(argv) == 0
    (app, host, port), = served
    settings = app.state.service.handle.settings
    assert (settings.group_size, settings.window, settings.mode) == (3, 8, "leaky")
    assert (app.state.service.max_input_tokens, host, port) == (50, "127.0.0.1", 8123)


def test_default_max_input_tokens_from_the_command(tiny, served):
    assert cli.main(["serve", "--model", str(tiny), "--group-size", "2"]) == 0
    assert served[0][0].state.service.max_input_tokens == LIMIT_G2  # 4 x 64 = 256 is above the extended limit


def test_max_output_tokens_from_the_command_is_in_the_startup_line(tiny, served, capsys):
    assert cli.main(["serve", "--model", str(tiny)]) == 0
    assert served[0][0].state.service.max_output_tokens == 64 // 4  # default: a quarter of the trained length
    assert "prompts up to 256 tokens, answers up to 16 tokens" in capsys.readouterr().err
    assert cli.main(["serve", "--model", str(tiny), "--max-output-tokens", "40"]) == 0
    assert served[1][0].state.service.max_output_tokens == 40
    assert "answers up to 40 tokens" in capsys.readouterr().err
