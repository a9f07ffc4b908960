"""selfextend.evaluation.report and .render: Markdown tables and PNG plots, with no global matplotlib state."""

from __future__ import annotations

import json
import subprocess
import sys

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
import selfextend.bench, selfextend.evaluation.report as report
assert "matplotlib" not in sys.modules, "imported matplotlib"
report.write_report({str(tmp_path)!r}, 64)
assert "matplotlib.pyplot" not in sys.modules, "used pyplot"
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "perplexity.png").stat().st_size > 1000
    assert "| plain | 20 | 30 |" in (tmp_path / "report.md").read_text()
