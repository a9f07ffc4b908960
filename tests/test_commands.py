"""The `passkey` and `generate` commands (selfextend.commands) on the tiny checkpoint: what they print,
and bad input refused in one line, exit status 2, before any weights load or any method runs."""

from __future__ import annotations

import io
import sys

import pytest
import torch

import selfextend
from selfextend.cli import main
from selfextend.positions import DEFAULT_RULE, rule_window
from tiny_checkpoint import TINY_LENGTH
from tiny_fixtures import error_lines


def test_passkey_command_compares_plain_and_selfextend(tiny, capsys):
    assert main(["passkey", "--model", str(tiny), "--length", "300", "--key", "55555", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "| plain |" in out and "| selfextend | SelfExtend floor L=64" in out
    assert "prompt 300 tokens" in out and "passkey 55555" in out


@pytest.mark.parametrize("argv, message", [
    (["passkey", "--model", "/no/such/model"], "not found"),
    (["passkey", "--window", "64", "--length", "300"], "window must be"),
    (["passkey", "--depth", "1.5"], "--depth must be in"),
    (["generate", "-p", "q", "--temperature", "-1"], "argument --temperature: expected a finite number >= 0"),
])
def test_bad_arguments_exit_2_with_a_message(tiny, capsys, argv, message):
    if "--model" not in argv:
        argv = [argv[0], "--model", str(tiny), *argv[1:]]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_argparse_rejects_non_integer_group_size(tiny, capsys):
    assert main(["generate", "--model", str(tiny), "-p", "q", "-G", "1.5"]) == 2
    assert "expected a positive integer" in capsys.readouterr().err


def test_generate_streams_greedy_answer_equal_to_model_generate(tiny, loaded, tmp_path, capsys):
    model, tok = loaded
    doc = tmp_path / "doc.txt"
    doc.write_text("The grass is green. The sky is blue. " * 20)
    assert main(["generate", "--model", str(tiny), "-f", str(doc), "-p", "What color?", "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    ids = tok.apply_chat_template([{"role": "user", "content": doc.read_text().strip() + "\n\nWhat color?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    assert f"input {ids.shape[1]} tokens, trained length {TINY_LENGTH}" in captured.err
    assert "prefill" in captured.err and "decode 6 tokens" in captured.err
    with selfextend.enable(model), torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert captured.out.strip() == tok.decode(expected[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_generate_reads_stdin_and_refuses_beyond_limit(tiny, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("The sky is blue. " * 40))
    assert main(["generate", "--model", str(tiny), "-p", "q", "-G", "2"]) == 2
    err = capsys.readouterr().err
    w = rule_window(DEFAULT_RULE, 64)  # the default window
    assert f"extended limit is {(64 - w) * 2 + w} tokens" in err


@pytest.mark.parametrize("content", [bytes(range(256)), "caf\u00e9".encode("latin-1"), b"text\x00with a NUL"])
def test_generate_refuses_binary_or_non_utf8_file_in_one_line(tiny, tmp_path, capsys, content):
    doc = tmp_path / "doc.bin"
    doc.write_bytes(content)
    assert main(["generate", "--model", str(tiny), "-f", str(doc), "-p", "q"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and str(doc) in err[0] and "text" in err[0], err


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_generate_refuses_temperature_that_is_not_a_finite_non_negative_number(tiny, monkeypatch, capsys, value):
    monkeypatch.setattr(sys, "stdin", io.StringIO("The sky is blue."))
    assert main(["generate", "--model", str(tiny), "-p", "q", "--temperature", value]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "--temperature" in err[0], err


def test_passkey_refuses_bad_settings_before_running_the_plain_model(tiny, capsys):
    assert main(["passkey", "--model", str(tiny), "--length", "300", "-w", "64"]) == 2
    captured = capsys.readouterr()
    assert "plain" not in captured.out and "prompt 300 tokens" not in captured.out
    assert error_lines(captured.err) == [error_lines(captured.err)[-1]] and "window must be" in captured.err


def test_generate_with_a_temperature_too_small_to_divide_by_is_greedy(tiny, monkeypatch, capsys):
    """--temperature 1e-40 or 1e-300 used to end in a traceback (nan probabilities)."""
    answers = []
    for temperature in ("0", "1e-40", "1e-300"):
        monkeypatch.setattr(sys, "stdin", io.StringIO("The grass is green. The sky is blue."))
        assert main(["generate", "--model", str(tiny), "-p", "What color?", "--max-new-tokens", "6",
                     "--temperature", temperature]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0].strip() and answers == [answers[0]] * 3


@pytest.mark.parametrize("prompt", ["", "  \n"])
def test_generate_refuses_an_empty_prompt_before_reading_or_loading_anything(tiny, monkeypatch, capsys, prompt):
    """`generate -p ""` used to load the weights and then end in a traceback ("the prompt is empty")."""
    import selfextend.assets

    class Unread:
        def read(self):
            pytest.fail("stdin was read")

    monkeypatch.setattr(sys, "stdin", Unread())
    monkeypatch.setattr(selfextend.assets, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    assert main(["generate", "--model", str(tiny), "-p", prompt, "--no-chat"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("selfextend generate: error: --prompt is empty"), err
