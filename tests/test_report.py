"""selfextend.evaluation.report and .render: Markdown tables and PNG plots, with no global matplotlib state."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from selfextend.evaluation.render import markdown_table


def test_markdown_table_formats_floats_and_aligns_columns():
    assert markdown_table(["n", "method", "ppl"], [[2048, "plain", 25.0712], [4096, "yarn", 1234.5]], align="rlr") == (
        "| n | method | ppl |\n|---:|---|---:|\n| 2048 | plain | 25.1 |\n| 4096 | yarn | 1.23e+03 |")


def test_report_sets_no_matplotlib_backend_on_import_or_when_plotting(tmp_path):
    # importing the report (or the benchmark) must not switch the user's backend (it used to run
    # matplotlib.use("Agg") at import); plots are drawn without pyplot's global state
    records = [{"trial": {"experiment": "perplexity", "method": m, "length": n, "sequence": 0}, "ppl": p}
               for m, n, p in (("plain", 32, 20.0), ("plain", 128, 30.0), ("selfextend", 128, 21.0))]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    script = f"""
import sys

import pytest
import selfextend.bench, selfextend.evaluation.report as report
assert "matplotlib" not in sys.modules, "imported matplotlib"
report.write_report({str(tmp_path)!r}, 64)
assert "matplotlib.pyplot" not in sys.modules, "used pyplot"
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "perplexity.png").stat().st_size > 1000
    assert "| plain | 20 | 30 |" in (tmp_path / "report.md").read_text()


def test_wilson_interval_matches_published_values():
    from selfextend.evaluation.report import wilson_interval

    # 95% Wilson score intervals (Newcombe 1998, Table I): 0/10 -> 0-0.2775, 5/10 -> 0.2366-0.7634
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert wilson_interval(5, 10) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(1 - 0.2775, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)  # no trials: nothing known
    for n in range(1, 60):  # every interval holds its fraction: 6/6 once ended at 0.9999999999999999
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0
        assert all(0.0 <= wilson_interval(k, n)[0] <= k / n <= wilson_interval(k, n)[1] <= 1.0 for k in range(n + 1))


def test_the_passkey_plot_draws_cells_that_are_all_right_or_all_wrong(tmp_path):
    from selfextend.evaluation.report import passkey_section

    records = [_record("passkey", "rerope", 16384, depth=d, key=str(d), score=1.0) for d in range(6)]
    records += [_record("passkey", "plain", 16384, depth=d, key=str(d), score=0.0) for d in range(11)]
    assert "| rerope | 6/6 |" in passkey_section(records, tmp_path, 8192)
    assert (tmp_path / "passkey.png").stat().st_size > 0


def _record(experiment, method, length, settings=None, **fields):
    trial = {"experiment": experiment, "method": method, "length": length}
    trial.update({k: fields.pop(k) for k in ("depth", "key", "sequence") if k in fields})
    return {"trial": trial, "settings": settings or {}, "seconds": 1.0, **fields}


def _passkeys(method, length, correct, trials, settings=None):
    return [_record("passkey", method, length, settings, depth=i / 10, key=str(10000 + i), score=float(i < correct))
            for i in range(trials)]


def test_accuracy_cells_show_correct_over_trials(tmp_path):
    records = (_passkeys("plain", 4096, 3, 3) + _passkeys("plain", 12288, 1, 4) + _passkeys("selfextend", 12288, 4, 4)
               + [_record("needle", "plain", 4096, depth=d, score=s) for d, s in ((0.2, 1.0), (0.8, 0.5))]
               + [_record("keylength", "plain", 12288, depth=0.5, key="12345", score=1.0)])
    report = write(tmp_path, records).read_text()
    assert "| plain | 3/3 | 1/4 |" in report and "| selfextend | - | 4/4 |" in report
    assert "| plain | 1/2 (0.75) |" in report  # needle: full answers / trials (mean score)
    assert "| plain | 1/1 |" in report          # keylength
    assert (tmp_path / "passkey.png").stat().st_size > 1000


def test_same_prompts_table_counts_every_method_on_the_defaults_prompts_only(tmp_path):
    # the default ran 4 prompts at 16384 (3 right); plain ran 2 of them (0 right) plus one other prompt
    # (right); yarn ran none of them: "-", not a count over different prompts
    records = (_passkeys("selfextend@cover", 16384, 3, 4) + _passkeys("plain", 16384, 0, 2)
               + [_record("passkey", "plain", 16384, depth=0.5, key="99999", score=1.0),
                  _record("passkey", "yarn", 16384, depth=0.5, key="99999", score=1.0)])
    report = write(tmp_path, records).read_text()
    assert "| plain | 1/3 |" in report  # the pooled table: all of plain's trials
    table = report.split("On the same prompts")[1]
    assert "| method | 16384 (4 prompts) |" in table
    assert "| plain | 0/2 |" in table and "| yarn | - |" in table and "| selfextend@cover | 3/4 |" in table


def test_accuracy_panel_carries_wilson_intervals():
    from selfextend.evaluation.report import _by, accuracy_panel, wilson_interval

    cells = _by(_passkeys("plain", 100, 1, 4) + _passkeys("plain", 200, 0, 2), "passkey", "method", "length")
    panel = accuracy_panel(cells, ["plain"], [100, 200, 300])
    assert panel.lines["plain"] == ([100, 200, 300], [0.25, 0.0, None])
    lows, highs = panel.intervals["plain"]
    assert (lows[0], highs[0]) == wilson_interval(1, 4) and (lows[1], highs[1]) == wilson_interval(0, 2)


def write(tmp_path, records):
    from selfextend.evaluation.report import write_report

    return write_report(tmp_path, 8192, "", records)


def _study(tmp_path):
    """Three rules at two lengths past L = 8192: the paper's, a fixed one and a fraction rule."""
    records = []
    for n, g in ((12288, 2), (16384, 3)):
        records += _passkeys("selfextend@cover", n, 5, 10, {"G": g, "w": 2048})
        records += _passkeys("selfextend:4:1024", n, 9, 10, {"G": 4, "w": 1024})
        records += _passkeys("selfextend@f=0.5", n, 10, 10, {"G": g + 2, "w": 1024})
        records += [_record("perplexity", "selfextend@cover", n, {"G": g, "w": 2048}, sequence=0, ppl=20.0),
                    _record("perplexity", "selfextend:4:1024", n, {"G": 4, "w": 1024}, sequence=0, ppl=20.2),
                    _record("perplexity", "selfextend@f=0.5", n, {"G": g + 2, "w": 1024}, sequence=0, ppl=20.6)]
        records += [_record("needle", "selfextend@f=0.5", n, {"G": g + 2, "w": 1024}, depth=0.5, score=0.5)]
    records += _passkeys("plain", 12288, 0, 10) + _passkeys("selfextend@cover", 4096, 3, 3)  # not part of the study
    return records


def test_study_section_compares_rules_and_names_the_best_within_the_perplexity_budget(tmp_path):
    report = write(tmp_path, _study(tmp_path)).read_text()
    study = report.split("## Study: choosing G and w")[1]
    # summary: all lengths pooled, with the 95% interval, and the worst perplexity change
    assert "| selfextend:4:1024 | 18/20 | 0.70-0.97 |" in study and "+1.0% | yes |" in study
    assert "| selfextend@f=0.5 | 20/20 | 0.84-1.00 | 0/2 (0.5) | +3.0% | no |" in study
    # per length: the resolved G and w, k/n, perplexity change against the paper's rule
    assert "| selfextend@f=0.5 | 16384 | 5 | 1024 | 10/10 | 0/1 (0.5) | 20.6 | +3.0% |" in study
    assert "| plain |" not in study and "| 4096 |" not in study
    # f=0.5 retrieves best but costs 3% perplexity: the criterion picks the fixed rule
    assert "the best measured rule is **selfextend:4:1024**, compared on the 20 passkey prompts" in study
    assert "selfextend:4:1024 18/20, selfextend@cover 10/20" in study
    assert "to be written in `study.md`" in study
    assert (tmp_path / "study.png").stat().st_size > 1000


def test_study_criterion_compares_rules_on_the_prompts_they_share(tmp_path):
    """A rule that skipped the hard length must not win by pooling: f=1 found 10/10 at 12288 and never ran
    16384; the fixed rule found 9/10 at 12288 (18/20 in all). On the shared prompts f=1 leads."""
    records = _study(tmp_path) + _passkeys("selfextend@f=1", 12288, 10, 10, {"G": 2, "w": 1024})
    records += [_record("perplexity", "selfextend@f=1", n, {"G": 2, "w": 1024}, sequence=0, ppl=20.1)
                for n in (12288, 16384)]
    study = write(tmp_path, records).read_text().split("## Study: choosing G and w")[1]
    assert "the best measured rule is **selfextend@f=1**, compared on the 10 passkey prompts every qualifying " \
           "rule ran (at 12288 tokens): selfextend@f=1 10/10, selfextend:4:1024 9/10, selfextend@cover 5/10" in study
    # without f=1's trial of the prompt the fixed rule missed, the two tie on the other nine: the smaller
    # perplexity cost (+0.5% against +1.0%) decides
    records = [r for r in records if not (r["trial"]["method"] == "selfextend@f=1" and r["trial"].get("depth") == 0.9)]
    study = write(tmp_path, records).read_text().split("## Study: choosing G and w")[1]
    assert "the best measured rule is **selfextend@f=1**, compared on the 9 passkey prompts every qualifying rule " \
           "ran (at 12288 tokens): selfextend@f=1 9/9, selfextend:4:1024 9/9, selfextend@cover 5/9" in study


def test_study_section_pastes_the_hand_written_notes(tmp_path):
    (tmp_path / "study.md").write_text("Chosen: selfextend@f=0.5, because it retrieves.\n")
    report = write(tmp_path, _study(tmp_path)).read_text()
    assert "Chosen: selfextend@f=0.5, because it retrieves." in report and "to be written" not in report


def test_no_study_section_without_a_rule_method(tmp_path):
    records = _passkeys("selfextend:2:2048", 12288, 5, 10) + _passkeys("selfextend:4:1024", 12288, 9, 10)
    assert "## Study" not in write(tmp_path, records).read_text()


def test_method_tables_show_selfextend_by_rule_and_leave_missing_cells_as_dashes(tmp_path):
    # fixed-G variants belong to the Study section; a length a method has no trial at shows "-"
    ppl = [("plain", 4096, 20.0), ("plain", 12288, 30.0), ("selfextend@cover", 12288, 21.0),
           ("selfextend:4:1024", 12288, 21.5)]
    records = [_record("perplexity", m, n, {}, sequence=0, ppl=p) for m, n, p in ppl]
    table = write(tmp_path, records).read_text().split("## Perplexity vs length")[1].split("##")[0]
    assert "| selfextend@cover | - | 21 |" in table and "selfextend:4:1024" not in table
    assert "nan" not in table
