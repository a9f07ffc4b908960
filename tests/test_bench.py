"""`selfextend bench` (selfextend.commands.bench, selfextend.bench) on the tiny checkpoint: cells in
subprocesses, ratios to plain, several SelfExtend settings in one run, bad input refused before the
first cell."""

from __future__ import annotations

import json

import pytest

from selfextend.cli import main
from tiny_fixtures import error_lines


def test_bench_runs_several_selfextend_settings_in_one_run(tiny, tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(tiny), "--lengths", "96", "--methods", "plain,selfextend,selfextend:4:16",
                 "--rule", "f=0.5", "-w", "8", "--decode-tokens", "2", "--out", str(out)]) == 0
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [(r["method"], r["length"]) for r in rows] == [("plain", 96), ("selfextend@f=0.5:-:8", 96),
                                                          ("selfextend:4:16", 96)]
    assert all(r["prefill_s"] > 0 and r["decode_s_per_token"] > 0 for r in rows)
    # --rule f=0.5 keeps grouped distances below 32 (half of L = 64): (32 - 8) * 4 + 8 >= 96
    assert [(r["group_size"], r["window"]) for r in rows[1:]] == [(4, 8), (4, 16)]
    table = (out / "bench.md").read_text()
    assert "| 96 | plain |  |" in table
    assert "| 96 | selfextend@f=0.5:-:8 | 4 |" in table and "| 96 | selfextend:4:16 | 4 |" in table
    assert (out / "bench.png").stat().st_size > 1000


def test_bench_in_bfloat16_repeated_reports_the_best_round_and_the_grouped_keys_kept(tiny, tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(tiny), "--lengths", "96", "--methods", "plain,selfextend:4:16",
                 "--decode-tokens", "2", "--dtype", "bfloat16", "--repeat", "2", "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    plain, extended = report["rows"]
    assert len(plain["rounds"]) == 2 and plain["prefill_s"] == min(r["prefill_s"] for r in plain["rounds"])
    assert report["dtype"] == "bfloat16" and plain["dtype"] == extended["dtype"] == "bfloat16"
    assert plain["grouped_key_bytes"] == 0 < extended["grouped_key_bytes"]
    assert "grouped keys MiB" in (out / "bench.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--methods", "plain,ntk"], "unknown method 'ntk'"),
    (["--methods", "plain,selfextend:4:64"], "window must be"),
    (["-w", "64"], "window must be"),
    (["--lengths", "96,x"], "--lengths"),
])
def test_bench_refuses_bad_input_before_any_cell(tiny, tmp_path, capsys, argv, message):
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(tiny), "--out", str(out), *argv]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_naive_cell_leaves_the_selfextend_attention_registered(tiny):
    # the naive merge runs under its own name; it used to replace "selfextend" for the whole process
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from selfextend.bench import run_cell
    from selfextend.evaluation.methods import Method

    registered = ALL_ATTENTION_FUNCTIONS["selfextend"]
    row = run_cell(str(tiny), "naive", 96, 2, Method("selfextend", rule="f=0.5"))
    assert ALL_ATTENTION_FUNCTIONS["selfextend"] is registered
    assert row["prefill_s"] > 0 and row["group_size"] == 4  # the rule f=0.5: (32 - 8) * 4 + 8 >= 96
