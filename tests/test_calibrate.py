"""`selfextend calibrate`: the effective length, the recommendation derived from it, and the command on
the tiny checkpoint (whose random weights never find a passkey unless the scorer is told otherwise)."""

from __future__ import annotations

import json

import pytest

import selfextend
from selfextend import prompts
from selfextend.cli import main
from selfextend.evaluation.calibration import check_target, effective_length, recommend
from selfextend.positions import DEFAULT_RULE, choose_settings
from tiny_fixtures import error_lines


@pytest.mark.parametrize("passkey, expected", [
    ([(2048, 3, 3), (4096, 3, 3), (6144, 2, 3), (8192, 3, 3)], 8192),
    ([(2048, 3, 3), (4096, 1, 3), (8192, 3, 3)], 2048),   # up from the shortest: a later success does not count
    ([(4096, 2, 4), (2048, 3, 3)], 2048),                 # half missed is a failure; lengths in any order
    ([(2048, 0, 3)], None),
])
def test_effective_length_is_where_retrieval_last_held(passkey, expected):
    assert effective_length(passkey) == expected


@pytest.mark.parametrize("effective, target, settings", [
    (8192, 32768, {"group_size": 5, "window": 1024}),    # f = 1: (8192 - 1024) * 5 + 1024 >= 32768
    (4096, 32768, {"group_size": 11, "window": 1024}),   # f = 0.5: (4096 - 1024) * 11 + 1024 >= 32768
    (6144, 16384, {"group_size": 3, "window": 1024}),    # f = 0.75
    (4096, 6144, {"group_size": 2, "window": 1024}),     # fits L, but past where the plain model retrieves
    (4096, 4000, {}),                                    # fits, and retrieves: nothing to change
    (None, 32768, {}),                                   # no retrieval to calibrate from: the default
])
def test_recommendation_keeps_grouped_distances_below_the_effective_length(effective, target, settings):
    advice = recommend(effective, 8192, target)
    assert advice.settings == settings
    if settings:
        g, w, reach = settings["group_size"], settings["window"], min(effective, 8192)
        assert (reach - w) * g + w >= target > (reach - w) * (g - 1) + w


CALIBRATE = ["calibrate", "--lengths", "160,200,240", "--target-length", "400", "--ppl-length", "128"]


def test_calibrate_stops_at_the_first_failing_length_and_prints_usable_settings(tiny, loaded, tmp_path, capsys,
                                                                                  essays, monkeypatch):
    answers = iter([True] * 3 + [False] * 3)  # the 3 depths at 160 tokens found, those at 200 missed
    monkeypatch.setattr(prompts, "passkey_correct", lambda text, key: next(answers))
    out = tmp_path / "calibration"
    assert main([*CALIBRATE, "--model", str(tiny), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "| 160 | 3/3 | yes |" in stdout and "| 200 | 0/3 | no |" in stdout
    assert "| 240 |" not in stdout  # early stop: 240 never ran
    assert "Effective length E = 160 tokens" in stdout
    # E = 160 > L = 64, so f = 1: w = 64 // 8 = 8, G = ceil((400 - 8) / (64 - 8)) = 7
    settings = json.loads(stdout.strip().splitlines()[-1])
    assert settings == {"group_size": 7, "window": 8}
    g, w = choose_settings(128, 64, DEFAULT_RULE)  # the default rule at the 128-token check length
    assert "| recommended | 7 | 8 |" in stdout and f"| default (selfextend) | {g} | {w} |" in stdout
    assert "selfextend.enable(model, rule='f=1', window=8)" in stdout
    summary = json.loads((out / "calibration.json").read_text())
    assert summary["effective_length"] == 160 and summary["settings"] == settings
    assert [r["trial"]["length"] for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())
            if r["trial"]["experiment"] == "passkey"] == [160] * 3 + [200] * 3
    model, _ = loaded
    with selfextend.enable(model, **settings) as handle:  # the printed dict is what enable takes
        assert (handle.group_size, handle.window) == (7, 8)


def test_calibrate_resumes_from_its_results(tiny, tmp_path, capsys, essays):
    out = tmp_path / "calibration"
    argv = [*CALIBRATE, "--model", str(tiny), "--out", str(out)]
    assert main(argv) == 0
    first = capsys.readouterr().out
    lines = (out / "results.jsonl").read_text()
    assert main(argv) == 0
    assert capsys.readouterr().out == first and (out / "results.jsonl").read_text() == lines
    # the random tiny model finds no passkey: nothing to calibrate from, the default is recommended
    assert "missed the passkey already at the shortest length" in first and first.strip().endswith("{}")


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "50"], "too short"),                   # the passkey prompt needs more tokens
    (["--depths", "0.5,2"], "depths must be in [0, 1]"),
    (["--ppl-length", "1000000"], "too few tokens"),
    (["--target-length", "0"], "expected a positive integer"),
])
def test_calibrate_refuses_bad_input_before_any_work(tiny, tmp_path, capsys, essays, argv, message):
    out = tmp_path / "calibration"
    assert main(["calibrate", "--model", str(tiny), "--out", str(out), "--lengths", "160", *argv]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_a_target_out_of_reach_is_refused_with_the_limit_before_any_work(tiny, tmp_path, capsys, essays,
                                                                        monkeypatch):
    """It used to run every trial and then answer `selfextend.enable(model)` for 99999999999 tokens."""
    import selfextend.assets

    monkeypatch.setattr(selfextend.assets, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    out = tmp_path / "calibration"
    assert main(["calibrate", "--model", str(tiny), "--out", str(out), "--target-length", "99999999999"]) == 2
    err = error_lines(capsys.readouterr().err)
    furthest = (64 - 8) * 64 + 8  # L = 64, w = L // 8, the largest G the rules choose (64)
    assert len(err) == 1 and "out of reach" in err[0] and f"at most {furthest} tokens" in err[0], err
    assert not out.exists()
    check_target(furthest, 64)  # the limit itself is within reach
    with pytest.raises(ValueError, match="out of reach"):
        check_target(furthest + 1, 64)


@pytest.mark.parametrize("effective, target", [
    (4096, 300_000),   # f = 0.5 at the largest G covers 197632 tokens
    (None, 400_000),   # the default (cover) reaches 395264 tokens
    (128, 8000),       # a tiny E: w = 64, (128 - 64) * 64 + 64 = 4160 < 8000 <= L
])
def test_a_recommendation_never_claims_more_than_it_reaches(effective, target):
    advice = recommend(effective, 8192, target)
    assert advice.settings, advice  # never `enable(model)` for a target the default cannot reach
    g, w = advice.settings["group_size"], advice.settings["window"]
    reach = min(effective or 8192, 8192)
    if (reach - w) * g + w >= target:  # grouped distances stay below E over the whole target
        assert "the smallest with" in advice.reason
    else:
        assert g == 64 and f"short of the target {target}" in advice.reason
        assert f"only up to {(reach - w) * g + w} tokens" in advice.reason


def test_calibrate_refuses_a_folder_another_run_is_using(tiny, tmp_path, capsys, essays):
    import os

    from selfextend.evaluation.experiments import FolderLock

    out = tmp_path / "calibration"
    with FolderLock(out):  # as a run in another process would hold it (flock: another open file)
        assert main([*CALIBRATE, "--model", str(tiny), "--out", str(out)]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and f"in use by another run (pid {os.getpid()}" in err[0], err
    assert not (out / "results.jsonl").exists()
