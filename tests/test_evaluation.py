"""selfextend.evaluation: the methods, the resumable runner and results.jsonl, the `eval` command and
its report, on the tiny checkpoint and a small local essay corpus."""

from __future__ import annotations

import json

import pytest
import torch

import selfextend
from selfextend.cli import main
from selfextend.evaluation.experiments import Grid, Inputs, Runner, load_results, trials
from selfextend.evaluation.methods import Method, applied, log_likelihoods, parse_methods
from selfextend.positions import DEFAULT_RULE, choose_group_size, choose_settings, max_extended_length, rule_window
from tiny_checkpoint import TINY_LENGTH
from tiny_fixtures import error_lines


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


@pytest.mark.parametrize("name", ["linear", "dynamic", "yarn"])
def test_a_model_with_a_rope_set_per_layer_type_gets_its_full_attention_set_scaled(name):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from conftest import L, ids_of, tiny_model
    from selfextend.evaluation.methods import ROPE_SCALING, scaled_rope_parameters

    model = tiny_model("gemma3")  # sliding layers: theta 1e4, full-attention layers: theta 1e6
    rotary = model.model.rotary_emb
    ids = ids_of(200)[0]
    plain_short, plain_long = log_likelihoods(model, ids[:L]), log_likelihoods(model, ids)
    with applied(model, Method(name), L):
        assert torch.equal(log_likelihoods(model, ids[:L]), plain_short)
    with applied(model, Method(name), 200) as settings:
        scaled = model.model.rotary_emb
        assert scaled is not rotary and settings == {"factor": 3.125}
        assert not torch.equal(log_likelihoods(model, ids), plain_long)
        # the sliding layers keep their frequencies; the full-attention layers get exactly what a model
        # with one rope set (the full-attention one) gets from transformers' own function
        assert torch.equal(scaled.sliding_attention_inv_freq, rotary.sliding_attention_inv_freq)
        one_set = AutoConfig.for_model("llama", head_dim=16, hidden_size=64, num_attention_heads=4,
                                       rope_parameters=scaled_rope_parameters(
                                           model.config, name, 200 / L, L)["full_attention"])
        if name != "dynamic":  # dynamic recomputes its frequencies for the length it is given, in forward
            expected, _ = ROPE_INIT_FUNCTIONS[ROPE_SCALING[name]](one_set, None)
            assert torch.equal(scaled.full_attention_inv_freq, expected)
        assert not torch.equal(scaled.full_attention_inv_freq, rotary.full_attention_inv_freq)
    assert model.model.rotary_emb is rotary
    assert torch.equal(log_likelihoods(model, ids), plain_long)


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


@pytest.mark.parametrize("spec, expected", [
    ("selfextend@cover", Method("selfextend", rule="cover")), ("selfextend:4:1024", Method("selfextend", 4, 1024)),
    ("selfextend@f=0.5:-:512", Method("selfextend", None, 512, "f=0.5")),
    ("leaky:-:512", Method("leaky", None, 512)), ("yarn", Method("yarn")),
])
def test_method_specs_round_trip(spec, expected):
    assert parse_methods(spec) == [expected] and expected.spec == spec


def test_bare_selfextend_is_recorded_under_the_default_rule():
    # a record names the rule it ran, so it keeps its meaning if the default ever changes
    assert parse_methods("selfextend") == [Method("selfextend", rule=DEFAULT_RULE)]
    assert parse_methods("selfextend")[0].spec == f"selfextend@{DEFAULT_RULE}"


@pytest.mark.parametrize("spec", ["yarn:2:8", "selfextend:4", "selfextend:x:8"])
def test_bad_method_specs_are_refused(spec):
    with pytest.raises(ValueError, match="method"):
        parse_methods(spec)


# -- rules that choose G and w from the input length (positions.choose_settings) -------------------
def test_cover_rule_is_todays_choice_for_the_whole_input():
    for n in (8193, 12288, 16384, 24576, 32768, 10**7):
        assert choose_settings(n, 8192, "cover") == (choose_group_size(n, 8192, 2048), 2048)
    assert choose_settings(8192, 8192, "cover") == (1, 2048)  # an input that fits runs as trained


@pytest.mark.parametrize("n, G", [(12288, 4), (16384, 5), (24576, 8), (32768, 11)])
def test_fraction_rule_keeps_grouped_distances_within_f_of_L(n, G):
    # f = 0.5 on L = 8192: w = L // 8 = 1024, reach 4096; G the smallest with (4096 - 1024) * G + 1024 >= n
    assert choose_settings(n, 8192, "f=0.5") == (G, 1024)
    assert max_extended_length(4096, 1024, G) >= n > max_extended_length(4096, 1024, G - 1)


def test_rules_keep_the_window_and_never_shrink_G_as_the_input_grows():
    # what lets the library use a rule per query position (length = position + 1)
    for rule in ("cover", "f=1", "f=0.75", "f=0.5", "f=0.3"):
        settings = [choose_settings(n, 64, rule) for n in range(1, 3000)]
        assert len({w for _, w in settings}) == 1, rule
        assert all(a[0] <= b[0] for a, b in zip(settings, settings[1:])), rule
    assert choose_settings(64, 64, "f=0.5") == (1, 8) and choose_settings(65, 64, "f=0.5") == (3, 8)
    assert choose_settings(100, 64, "f=0.5", window=4) == (4, 4)  # a window given overrides the rule's


@pytest.mark.parametrize("rule, message", [("f=0", "unknown rule"), ("f=1.5", "unknown rule"), ("f=nan", "unknown rule"),
                                           ("g=0.5", "unknown rule"), ("f=x", "unknown rule"), ("paper", "unknown rule"),
                                           ("f=0.1", "must be more than the window")])
def test_bad_rules_are_refused(rule, message):
    with pytest.raises(ValueError, match=message):
        choose_settings(100, 64, rule)  # f=0.1: reach 6 tokens, window 8


@pytest.mark.parametrize("spec, expected", [
    ("selfextend@f=0.5", Method("selfextend", rule="f=0.5")), ("selfextend@cover", Method("selfextend", rule="cover")),
    ("selfextend@cover:-:1024", Method("selfextend", None, 1024, "cover")),
])
def test_rule_method_specs_round_trip(spec, expected):
    assert parse_methods(spec) == [expected] and expected.spec == spec


def test_rule_method_specs_are_written_one_way():
    assert parse_methods("selfextend@f=0.50,selfextend@f=.5")[0].spec == "selfextend@f=0.5"
    assert len(parse_methods("selfextend@f=0.50,selfextend@f=.5")) == 1


@pytest.mark.parametrize("spec, message", [("leaky@f=0.5", "only selfextend takes a rule"),
                                           ("selfextend@f=0.5:4:16", "a rule chooses G"),
                                           ("selfextend@bogus", "unknown rule")])
def test_bad_rule_methods_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_methods(spec)


def test_eval_rule_method_records_the_settings_it_resolved_per_length(tiny, loaded, tmp_path, essays):
    # tiny L = 64, f = 0.5: w = 8, reach 32; the last of 128 tokens has G = ceil((128 - 8) / (32 - 8)) = 5
    out = tmp_path / "eval"
    assert main(["eval", "perplexity", "--model", str(tiny), "--out", str(out), "--lengths", "32,128",
                 "--methods", "plain,selfextend@f=0.5,selfextend:5:8"]) == 0
    records = {(r["trial"]["method"], r["trial"]["length"]): r for r in
               (json.loads(line) for line in (out / "results.jsonl").read_text().splitlines())}
    assert records[("selfextend@f=0.5", 32)]["settings"] == {"G": 1, "w": 8, "rule": "f=0.5"}
    assert records[("selfextend@f=0.5", 128)]["settings"] == {"G": 5, "w": 8, "rule": "f=0.5"}
    # what the library computes with the rule: G chosen once for the 128-token sequence, i.e. the fixed G = 5,
    # w = 8, whose trial was therefore copied from the rule's
    model, tok = loaded
    ids = torch.tensor(Inputs(tok).build(
        dict(experiment="perplexity", method="plain", length=128, sequence=0)))
    with selfextend.enable(model, rule="f=0.5"):
        expected = float(log_likelihoods(model, ids).mean().exp())
    assert records[("selfextend@f=0.5", 128)]["ppl"] == pytest.approx(expected, rel=1e-6)
    assert records[("selfextend:5:8", 128)]["same_as"] == "selfextend@f=0.5"
    assert "selfextend@f=0.5" in (out / "report.md").read_text()


def test_eval_does_not_run_a_computation_twice_under_two_method_names(tiny, tmp_path, essays):
    # tiny L = 64. Within L a rule has G = 1 everywhere: the plain model's computation, copied (seconds 0,
    # same_as names the method that ran); past L it groups and runs. selfextend:4:- is selfextend:4:w with
    # w the default window
    # (L // 4 = 16 for "cover", L // 8 = 8 for "f=F"): one fixed G and w, spelled twice
    out = tmp_path / "eval"
    argv = ["eval", "perplexity", "--model", str(tiny), "--out", str(out), "--lengths", "48,128"]
    w = rule_window(DEFAULT_RULE, 64)
    assert main([*argv, "--methods", f"plain,selfextend@f=0.5,selfextend:4:{w}"]) == 0
    records = {(r["trial"]["method"], r["trial"]["length"]): r for r in
               (json.loads(line) for line in (out / "results.jsonl").read_text().splitlines())}
    copied, ran = records[("selfextend@f=0.5", 48)], records[("plain", 48)]
    assert copied["same_as"] == "plain" and copied["seconds"] == 0.0 and copied["ppl"] == ran["ppl"]
    assert "same_as" not in records[("selfextend@f=0.5", 128)]
    # the copy is what running it gives
    alone = tmp_path / "alone"
    assert main(["eval", "perplexity", "--model", str(tiny), "--out", str(alone), "--lengths", "48",
                 "--methods", "selfextend@f=0.5"]) == 0
    assert json.loads((alone / "results.jsonl").read_text())["ppl"] == copied["ppl"]
    # a later run finds the earlier computations in results.jsonl too
    assert main([*argv, "--methods", "selfextend:4:-"]) == 0
    new = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()[6:]]
    assert [(r["trial"]["length"], r.get("same_as")) for r in new] == [(48, f"selfextend:4:{w}"), (128, f"selfextend:4:{w}")]


def test_eval_runner_writes_one_line_per_trial_and_resumes(loaded, tmp_path):
    model, tok = loaded
    grid = Grid(methods=parse_methods("plain,selfextend"), lengths=[200], depths=[0.5], keys=1, ppl_sequences=1)
    todo = trials("passkey", grid) + trials("perplexity", grid)
    assert len(todo) == 4 and {t["method"] for t in todo} == {"plain", f"selfextend@{DEFAULT_RULE}"}
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
    (["passkey", "--methods", "plain,selfextend@f=0.1"], "must be more than the window"),  # reach 6 <= w 8
    (["passkey", "--methods", "plain,selfextend@f=2"], "unknown rule"),
    (["passkey", "--methods", "plain,selfextend@f=0.5:-:40"], "must be more than the window w=40"),
    (["passkey", "--methods", "plain,selfextend", "--rule", "f=0.5", "-G", "4"], "--rule chooses G"),
    (["passkey", "--methods", "plain,selfextend", "--rule", "f=3"], "unknown rule"),
])
def test_eval_validates_everything_before_any_work(tiny, tmp_path, capsys, essays, argv, message):
    out = tmp_path / "eval"
    assert main(["eval", *argv, "--model", str(tiny), "--out", str(out), "--depths", "0.5", "--keys", "1"]) == 2
    err = error_lines(capsys.readouterr().err)
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
                 "--methods", "selfextend", "--rule", "cover"]) == 0
    last = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert last["trial"]["method"] == "selfextend@cover" and last["settings"] == {"G": 3, "w": 16, "rule": "cover"}
    assert main(["eval", "perplexity", "--model", str(tiny), "--out", str(out), "--lengths", "128",
                 "--methods", "selfextend", "--mode", "leaky", "-w", "8"]) == 0
    last = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert last["trial"]["method"] == "leaky:-:8"


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


def test_report_only_does_not_check_methods_it_does_not_run(tiny, tmp_path, essays):
    """A report is written from the results whatever methods the command line names (the default list
    holds `linear`, which Gemma 3 refuses); a run with the same methods refuses them, changing nothing."""
    out = tmp_path / "eval"
    argv = [*EVAL_PPL, "--model", str(tiny), "--out", str(out)]
    assert main(argv) == 0
    before = (out / "results.jsonl").read_bytes()
    (out / "report.md").unlink()
    unfit = [*argv[:3], "selfextend:2:64", *argv[4:]]  # w = 64 is not below the tiny model's L = 64
    assert main([*unfit, "--report-only"]) == 0
    assert "plain" in (out / "report.md").read_text()
    assert main(unfit) == 2
    assert (out / "results.jsonl").read_bytes() == before


def test_a_folder_of_another_models_results_is_refused(tiny, tmp_path, essays, capsys):
    """`--report-only` without the folder's --model once titled a Gemma 3 report with SmolLM2's trained
    length: a folder whose summary.json names another trained length is refused, and nothing changes."""
    out = tmp_path / "eval"
    argv = [*EVAL_PPL, "--model", str(tiny), "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    (out / "summary.json").write_text(json.dumps({**summary, "trained_length": 8192}))  # as another model's
    report, results = (out / "report.md").read_bytes(), (out / "results.jsonl").read_bytes()
    capsys.readouterr()
    assert main([*argv, "--report-only"]) == 2
    assert "trained length 8192" in capsys.readouterr().err
    assert main(argv) == 2
    assert (out / "report.md").read_bytes() == report and (out / "results.jsonl").read_bytes() == results


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


# ------------------------------------------------------------------------------------------------
# one run per results folder
# ------------------------------------------------------------------------------------------------

EVAL_ONE = ["eval", "passkey", "--methods", "plain", "--lengths", "300", "--depths", "0.5", "--keys", "1"]
HOLD_LOCK = """
import sys, time
from selfextend.evaluation.experiments import FolderLock
with FolderLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(300)
"""


def test_a_second_eval_on_a_folder_in_use_is_refused_naming_the_other_pid(tiny, tmp_path, capsys, monkeypatch):
    """Two runs on one folder used to both run every remaining trial (each appending its own records)."""
    import subprocess
    import sys

    import selfextend.assets

    out = tmp_path / "eval"
    argv = [*EVAL_ONE, "--model", str(tiny), "--out", str(out)]
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with monkeypatch.context() as m:
            m.setattr(selfextend.assets, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
            assert main(argv) == 2
        err = error_lines(capsys.readouterr().err)
        assert len(err) == 1 and f"in use by another run (pid {holder.pid}" in err[0] and "--out" in err[0], err
        assert sorted(p.name for p in out.iterdir()) == [".selfextend.lock"]  # nothing ran, nothing written
    finally:
        holder.kill()  # dies without releasing anything: the kernel drops its lock, the file stays
        holder.wait()
    assert (out / ".selfextend.lock").read_text().strip() == str(holder.pid)  # a stale lock file ...
    assert main(argv) == 0  # ... does not block the next run
    assert len((out / "results.jsonl").read_text().splitlines()) == 1
    assert not (out / ".selfextend.lock").exists()  # removed on release


def test_folder_lock_is_exclusive_until_released(tmp_path):
    import os

    from selfextend.evaluation.experiments import FolderBusy, FolderLock

    folder = tmp_path / "a" / "b"
    with FolderLock(folder) as lock:
        assert lock.path.read_text() == f"{os.getpid()}\n"
        with pytest.raises(FolderBusy, match=f"pid {os.getpid()}"):  # another open file: flock refuses it
            FolderLock(folder).acquire()
    with FolderLock(folder):  # released: free again
        pass
