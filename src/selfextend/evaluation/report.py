"""Tables (Markdown) and plots (PNG) from ``results.jsonl``; nothing here runs a model.

Every accuracy cell is ``k/n``: trials answered correctly out of trials run, so a reader sees how much
a cell can be trusted; accuracy plots draw each fraction with its 95% Wilson score interval.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from .experiments import COMMANDS, load_results
from .methods import ALL_METHODS, parse_method
from .render import Panel, markdown_table, new_figure, save_line_plots
from .ruler_report import ruler_section

STUDY_NOTES = "study.md"  # hand-written conclusion of the study, next to results.jsonl; pasted into the report
PPL_TOLERANCE = 0.02      # a rule may cost at most this much perplexity against the paper's rule to be the default
REFERENCE = "selfextend@cover"  # the paper's rule (the library's default before the study): perplexity baseline


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (z = 1.96) Wilson score interval for a success fraction ``k / n`` (E. B. Wilson, "Probable
    inference, the law of succession, and statistical inference", JASA 22, 1927). Unlike the normal
    approximation it stays inside [0, 1] and is not zero-width at 0/n or n/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at 0/n and n/n the bound equals p up to rounding (6/6 gave 0.9999999999999999): hold it to p
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def _correct(records) -> tuple[int, int]:
    """(k, n): trials with the full answer (score 1) and trials."""
    return sum(r["score"] >= 1 for r in records), len(records)


def _k_of_n(records) -> str:
    return "-" if not records else "{}/{}".format(*_correct(records))


def _methods(records, fixed: bool = False):
    """Method specs present, in the order of ALL_METHODS (a kind's rule variants after it). SelfExtend
    with a fixed G (``selfextend:G:w``) only with ``fixed``: the Study section compares those; the
    sections that compare methods show SelfExtend as the library runs it, by a rule."""
    present = {r["trial"]["method"] for r in records}
    if not fixed:
        present = {spec for spec in present
                   if not (parse_method(spec).name == "selfextend" and parse_method(spec).group_size is not None)}
    return sorted(present, key=lambda spec: (ALL_METHODS.index(parse_method(spec).name), spec))


def _by(records, experiment, *fields):
    groups = defaultdict(list)
    for r in records:
        t = r["trial"]
        if t["experiment"] == experiment:
            groups[tuple(t.get(f) for f in fields)].append(r)
    return groups


def _per_length(records, experiment: str, field: str):
    """(methods, lengths, rows): the mean of ``field`` per method (row) and length (column)."""
    cells = _by(records, experiment, "method", "length")
    if not cells:
        return None
    methods, lengths = _methods([r for g in cells.values() for r in g]), sorted({k[1] for k in cells})
    return methods, lengths, [[m] + [_mean([r[field] for r in cells[(m, n)]]) if cells.get((m, n)) else None
                                     for n in lengths] for m in methods]


def _curves(path: Path, lengths, methods, rows, L: int, **axes) -> None:
    """One line per method (``rows[i][1:]`` over ``lengths``), the trained length marked."""
    lines = {m: (lengths, row[1:]) for m, row in zip(methods, rows)}
    save_line_plots(path, [Panel(lines, axes, mark_x=(L, f"trained length {L}"))])


def accuracy_panel(cells, methods, lengths, L: int | None = None, **axes) -> Panel:
    """A panel of the fraction of full answers per method over ``lengths`` (``cells``: (method, length)
    -> records), each point with its 95% Wilson interval."""
    lines, intervals = {}, {}
    for m in methods:
        counts = [_correct(cells[(m, n)]) if cells.get((m, n)) else None for n in lengths]
        lines[m] = (lengths, [None if c is None else c[0] / c[1] for c in counts])
        bounds = [wilson_interval(*c) if c else (None, None) for c in counts]
        intervals[m] = ([b[0] for b in bounds], [b[1] for b in bounds])
    return Panel(lines, {"ylim": (-0.05, 1.05), **axes}, intervals=intervals, dodge=0.012,
                 mark_x=None if L is None else (L, f"trained length {L}"))


def passkey_section(records, out_dir: Path, L: int) -> str:
    cells = _by(records, "passkey", "method", "length")
    if not cells:
        return ""
    methods, lengths = _methods([r for g in cells.values() for r in g]), sorted({k[1] for k in cells})
    save_line_plots(out_dir / "passkey.png", [accuracy_panel(
        cells, methods, lengths, L, xlabel="prompt length (tokens)", ylabel="passkey accuracy (95% interval)",
        title="Passkey retrieval")])
    rows = [[m] + [_k_of_n(cells.get((m, n), [])) for n in lengths] for m in methods]
    n_trials = sum(len(g) for g in cells.values())
    return ("## Passkey retrieval\n\nCorrect answers / trials over depths and keys (" + f"{n_trials} trials); the "
            "plot shows each fraction with its 95% Wilson score interval.\n\n"
            + markdown_table(["method"] + [str(n) for n in lengths], rows) + "\n\n![passkey](passkey.png)\n"
            + same_prompts_table(cells, methods, lengths))


def same_prompts_table(cells, methods, lengths) -> str:
    """Like with like: at each length, every method counted only on the prompts (depth, key) that
    ``REFERENCE`` ran there; ``k/n`` with ``n`` below the reference's where a method ran fewer of them."""
    def prompt(record):
        return record["trial"]["depth"], record["trial"]["key"]

    prompts = {n: {prompt(r) for r in cells.get((REFERENCE, n), [])} for n in lengths}
    shown = [n for n in lengths if len(prompts[n]) > 1]
    if REFERENCE not in methods or not shown:
        return ""
    rows = [[m] + [_k_of_n([r for r in cells.get((m, n), []) if prompt(r) in prompts[n]]) for n in shown]
            for m in methods]
    return (f"\nOn the same prompts: at each length, every method on the prompts `{REFERENCE}` ran there "
            "(correct / trials of those):\n\n" + markdown_table(["method"] + [f"{n} ({len(prompts[n])} prompts)"
                                                                             for n in shown], rows) + "\n")


def heatmap_section(records, out_dir: Path, experiment: str, title: str) -> str:
    cells = _by(records, experiment, "method", "length", "depth")
    if not cells:
        return ""
    methods = _methods([r for g in cells.values() for r in g])
    lengths, depths = sorted({k[1] for k in cells}), sorted({k[2] for k in cells})
    fig = new_figure(2.2 * len(methods) + 1, 3.2)
    axes = fig.subplots(1, len(methods), squeeze=False, sharey=True)
    for ax, m in zip(axes[0], methods):
        grid = [[_mean([r["score"] for r in cells.get((m, n, d), [])]) for n in lengths] for d in depths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_title(m, fontsize=9)
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
        ax.set_xlabel("length")
    axes[0][0].set_ylabel("depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(title)
    fig.savefig(out_dir / f"{experiment}.png", dpi=120, bbox_inches="tight")
    per_length = _by(records, experiment, "method", "length")
    rows = [[m] + [_needle_cell(per_length.get((m, n), [])) for n in lengths] for m in methods]
    return (f"## {title}\n\nTrials with the full answer / trials over depths; in brackets the mean score (half "
            "credit for one of the two key words). The heatmaps show the mean score per depth.\n\n"
            + markdown_table(["method"] + [str(n) for n in lengths], rows) + f"\n\n![{experiment}]({experiment}.png)\n")


def _needle_cell(records) -> str:
    return "-" if not records else f"{_k_of_n(records)} ({_mean([r['score'] for r in records]):.2g})"


def keylength_section(records) -> str:
    cells = _by(records, "keylength", "method", "key")
    if not cells:
        return ""
    methods = _methods([r for g in cells.values() for r in g])
    keys = sorted({k[1] for k in cells}, key=len)
    length = next(iter(cells.values()))[0]["trial"]["length"]
    rows = [[m] + [_k_of_n(cells.get((m, k), [])) for k in keys] for m in methods]
    return (f"## Passkey with longer keys (length {length}, depth 0.5; correct / trials)\n\n"
            + markdown_table(["method"] + [f"{len(k)} digits" for k in keys], rows) + "\n")


def perplexity_section(records, out_dir: Path, L: int) -> str:
    table = _per_length(records, "perplexity", "ppl")
    if table is None:
        return ""
    methods, lengths, rows = table
    _curves(out_dir / "perplexity.png", lengths, methods, rows, L, xlabel="sequence length (tokens)",
            ylabel="perplexity", yscale="log", title="Perplexity vs length (essays)")
    return ("## Perplexity vs length\n\nSame essay token sequences for every method (lower is better).\n\n"
            + markdown_table(["method"] + [str(n) for n in lengths], rows) + "\n\n![perplexity](perplexity.png)\n")


def short_context_section(records, L: int) -> str:
    rows = []
    for exp, field_ in (("perplexity", "ppl"), ("passkey", "score"), ("needle", "score")):
        cells = _by([r for r in records if r["trial"]["length"] <= L], exp, "method", "length")
        for n in sorted({k[1] for k in cells}):
            plain_records = cells.get(("plain", n), [])
            plain = _mean([r[field_] for r in plain_records])
            for m in _methods([r for g in cells.values() for r in g]):
                if m != "plain" and (m, n) in cells:
                    value = _mean([r[field_] for r in cells[(m, n)]])
                    shown = (plain, value) if field_ == "ppl" else (_k_of_n(plain_records), _k_of_n(cells[(m, n)]))
                    rows.append([exp, n, m, *shown, value - plain])
    if not rows:
        return ""
    return (f"## Short context (length <= trained {L})\n\nSelfExtend with G chosen from the length, and the rope "
            "scaling baselines (factor 1 here), must equal the plain model; a fixed G > 1, rerope and leaky regroup "
            "distances beyond w and need not. Accuracy as correct / trials; the difference is in the mean score.\n\n"
            + markdown_table(["experiment", "length", "method", "plain", "method value", "difference"], rows) + "\n")


def ablation_section(records, out_dir: Path) -> str:
    cells = _by(records, "ablation", "window", "group_size")
    if not cells:
        return ""
    windows, groups = sorted({k[0] for k in cells}), sorted({k[1] for k in cells})
    length = next(iter(cells.values()))[0]["trial"]["length"]
    rows = [[w] + [cells[(w, g)][0]["ppl"] if (w, g) in cells else "-" for g in groups] for w in windows]
    lines = {f"w={w}": (groups, [None if v == "-" else v for v in row[1:]]) for w, row in zip(windows, rows)}
    save_line_plots(out_dir / "ablation.png", [Panel(lines, dict(
        xlabel="group size G", ylabel=f"perplexity at {length} tokens", xscale="log", yscale="log",
        title="SelfExtend: group size and window"), xticks=groups)])
    return (f"## Ablation of G and w (perplexity at {length} tokens)\n\nRows: window w; columns: group size G. "
            "(L - w) * G + w below the length means distances beyond the trained range occur.\n\n"
            + markdown_table(["w \\ G"] + [str(g) for g in groups], rows) + "\n\n![ablation](ablation.png)\n")


STUDY_EXPERIMENTS = ("passkey", "needle", "perplexity")


def _study_cells(records, L: int) -> dict:
    """experiment -> (method, length) -> records, for the SelfExtend (floor) methods past ``L``: rules
    ``selfextend@...`` and fixed settings ``selfextend:G:w``."""
    study = [r for r in records if r["trial"]["experiment"] in STUDY_EXPERIMENTS and r["trial"]["length"] > L
             and parse_method(r["trial"]["method"]).name == "selfextend"]
    return {e: _by(study, e, "method", "length") for e in STUDY_EXPERIMENTS}


def _ppl(cells, method, length) -> float | None:
    records = cells["perplexity"].get((method, length))
    return _mean([r["ppl"] for r in records]) if records else None


def _ppl_changes(cells, method, lengths) -> list[float]:
    """Relative perplexity change against the paper's rule (REFERENCE) at each length both have."""
    pairs = [(_ppl(cells, method, n), _ppl(cells, REFERENCE, n)) for n in lengths]
    return [value / today - 1 for value, today in pairs if value is not None and today is not None]


def _study_summary(cells, methods, lengths) -> tuple[list[list], list[str]]:
    """(rows of the summary table, the rules that qualify for the default): rules whose perplexity stays
    within PPL_TOLERANCE of the paper's rule at every length where perplexity was measured for both,
    and that have passkey trials."""
    rows, qualified = [], []
    ppl_lengths = sorted({n for (_, n) in cells["perplexity"]})
    for m in methods:
        passkey = [r for n in lengths for r in cells["passkey"].get((m, n), [])]
        needle = [r for n in lengths for r in cells["needle"].get((m, n), [])]
        k, n = _correct(passkey)
        lo, hi = wilson_interval(k, n)
        changes = _ppl_changes(cells, m, ppl_lengths)
        complete = len(changes) == len(ppl_lengths) > 0
        within = complete and max(changes) <= PPL_TOLERANCE
        rows.append([m, f"{k}/{n}" if n else "-", f"{lo:.2f}-{hi:.2f}" if n else "-", _needle_cell(needle),
                     f"{max(changes):+.1%}" if changes else "-", ("yes" if within else "no") if complete else "-"])
        if within and n:
            qualified.append(m)
    return rows, qualified


def _scores(cells, experiment, method, lengths) -> dict[tuple, float]:
    """input (length, depth, key) -> score of ``method``'s trials of ``experiment`` at ``lengths``."""
    return {(n, r["trial"].get("depth"), r["trial"].get("key")): r["score"]
            for n in lengths for r in cells[experiment].get((method, n), [])}


def _best_on_shared_prompts(cells, qualified, lengths) -> tuple[str | None, str]:
    """The best of the ``qualified`` rules by retrieval, compared only on the prompts every one of them
    ran (pooling over different prompts would favour a rule that skipped the hard lengths): passkey
    accuracy, then needle mean score, then the lower worst perplexity change. Returns (rule or None,
    what was compared)."""
    if not qualified:
        return None, ""
    ppl_lengths = sorted({n for (_, n) in cells["perplexity"]})
    scores = {e: {m: _scores(cells, e, m, lengths) for m in qualified} for e in ("passkey", "needle")}
    shared = {e: set.intersection(*(set(s) for s in per_rule.values())) for e, per_rule in scores.items()}
    if not shared["passkey"]:
        return None, "no passkey prompt that every qualifying rule ran"
    ranked = [(sum(scores["passkey"][m][i] >= 1 for i in shared["passkey"]),
               sum(scores["needle"][m][i] for i in shared["needle"]), -max(_ppl_changes(cells, m, ppl_lengths)), m)
              for m in qualified]
    ranked.sort(reverse=True)
    at = sorted({i[0] for i in shared["passkey"]})
    listed = ", ".join(f"{m} {k}/{len(shared['passkey'])}" for k, _, _, m in ranked)
    return ranked[0][-1], (f"on the {len(shared['passkey'])} passkey prompts every qualifying rule ran "
                           f"(at {', '.join(map(str, at))} tokens): {listed}")


def study_section(records, out_dir: Path, L: int) -> str:
    """Choosing G and w: every SelfExtend rule side by side past the trained length (present once the
    results hold a rule method, ``selfextend@...``), with the plot and the notes in ``study.md``."""
    if not any(parse_method(r["trial"]["method"]).rule for r in records):
        return ""
    cells = _study_cells(records, L)
    present = [r for e in cells.values() for g in e.values() for r in g]
    if not present:
        return ""
    methods, lengths = _methods(present, fixed=True), sorted({r["trial"]["length"] for r in present})
    detail = []
    for m in methods:
        for n in lengths:
            found = [cells[e].get((m, n), []) for e in STUDY_EXPERIMENTS]
            if not any(found):
                continue
            settings = next(g for g in found if g)[0].get("settings", {})
            value, today = _ppl(cells, m, n), _ppl(cells, REFERENCE, n)
            change = f"{value / today - 1:+.1%}" if value is not None and today is not None else "-"
            detail.append([m, n, settings.get("G", "-"), settings.get("w", "-"), _k_of_n(found[0]),
                           _needle_cell(found[1]), "-" if value is None else value, change])
    summary, qualified = _study_summary(cells, methods, lengths)
    best, compared = _best_on_shared_prompts(cells, qualified, lengths)
    passkey = accuracy_panel(cells["passkey"], methods, lengths, xlabel="prompt length (tokens)",
                             ylabel="passkey accuracy (95% interval)", title="Passkey")
    passkey.xticks = lengths
    needle = {m: (lengths, [_mean([r["score"] for r in cells["needle"][(m, n)]]) if cells["needle"].get((m, n))
                            else None for n in lengths]) for m in methods}
    ppl = {m: (lengths, [_ppl(cells, m, n) for n in lengths]) for m in methods}
    save_line_plots(out_dir / "study.png", [
        passkey,
        Panel(needle, dict(xlabel="prompt length (tokens)", ylabel="needle: mean score", ylim=(-0.05, 1.05),
                           title="Needle"), xticks=lengths),
        Panel(ppl, dict(xlabel="sequence length (tokens)", ylabel="perplexity", title="Perplexity (essays)"),
              xticks=lengths),
    ], panel_size=(5.5, 4))
    criterion = (f"By the criterion for the default (retrieval first; perplexity at most {PPL_TOLERANCE:.0%} above the "
                 f"paper's rule at every measured length) the best measured rule is **{best}**, compared {compared}."
                 if best else f"No rule has perplexity measured at every length and within {PPL_TOLERANCE:.0%} of the "
                 f"paper's rule, with passkey prompts in common, yet{': ' + compared if compared else ''}.")
    notes_path = out_dir / STUDY_NOTES
    notes = (notes_path.read_text().strip() if notes_path.exists()
             else f"_The chosen rule and why: to be written in `{STUDY_NOTES}` next to results.jsonl._")
    return (f"## Study: choosing G and w (past the trained length {L})\n\n"
            "Rules, as methods of `selfextend eval`, each choosing G once for the input from its length, as "
            "`selfextend.enable` does (so a rule past L computes exactly the fixed G it picks, and shares its "
            "trials): `selfextend@cover` is the paper's rule (w = L // 4, the smallest G that covers the input; "
            "the library's default before this study); `selfextend@f=F` keeps the largest grouped distance below "
            "F * L with w = L // 8 (`positions.choose_settings`; `:-:w` fixes w); `selfextend:G:w` fixes both. Passkey and needle as correct / trials (needle: mean score in brackets); "
            f"perplexity change against `{REFERENCE}` at the same length.\n\n"
            + markdown_table(["rule", "passkey (all lengths)", "95% interval", "needle", "worst perplexity change",
                              f"within {PPL_TOLERANCE:.0%}"], summary) + "\n\n"
            + markdown_table(["rule", "length", "G", "w", "passkey", "needle", "perplexity", "vs cover"], detail,
                             align="lrrrllrr") + "\n\n![study](study.png)\n\n" + criterion + "\n\n" + notes + "\n")


def budget_section(records) -> str:
    """Trials and compute time per experiment, summed from the records."""
    per = defaultdict(lambda: [0, 0.0, set()])
    for r in records:
        t = r["trial"]
        per[t["experiment"]][0] += 1
        per[t["experiment"]][1] += r.get("seconds", 0.0)
        per[t["experiment"]][2].add(t["length"])
    rows = [[e, n, f"{s / 60:.1f}", ", ".join(str(x) for x in sorted(lengths))] for e, (n, s, lengths) in per.items()]
    total = sum(v[1] for v in per.values())
    copied = sum("same_as" in r for r in records)
    copies = f" ({copied} copied from a trial of another method with the same input, G and w)" if copied else ""
    return (f"Compute: {len(records)} trials{copies}, {total / 3600:.2f} h in all (sum of trial times).\n\n"
            + markdown_table(["experiment", "trials", "minutes", "lengths"], rows) + "\n\n")


SUMMARY = "summary.json"  # written beside report.md: the trial count and the trained length


def report_header(out_dir: Path, name: str, L: int) -> str:
    """The report's title and the commands that produced the folder (``commands.txt``), in order."""
    path = Path(out_dir) / COMMANDS
    commands = path.read_text().splitlines() if path.exists() else []
    text = f"# Evaluation: {name} (trained length {L})\n\nProduced by these commands, in order (a rerun skips finished trials):\n\n"
    return text + "```\n" + "\n".join(commands) + "\n```\n\n"


def write_report(out_dir: Path, L: int, header: str = "", records: list[dict] | None = None) -> Path:
    """Write ``report.md`` (and the PNGs it shows) from ``records`` (default: read ``results.jsonl``);
    return its path."""
    out_dir = Path(out_dir)
    if records is None:
        records = list(load_results(out_dir / "results.jsonl").values())
    sections = [passkey_section(records, out_dir, L), keylength_section(records),
                heatmap_section(records, out_dir, "needle", "Needle in a haystack (Paul Graham essays)"),
                perplexity_section(records, out_dir, L), short_context_section(records, L),
                ablation_section(records, out_dir), study_section(records, out_dir, L),
                ruler_section(records, _methods(records, fixed=True))]
    path = out_dir / "report.md"
    path.write_text(header + budget_section(records) + "\n\n".join(s for s in sections if s))
    (out_dir / SUMMARY).write_text(json.dumps({"trials": len(records), "trained_length": L}, indent=1))
    return path


def recorded_trained_length(out_dir: Path) -> int | None:
    """The trained length of the model whose results the folder's last report was written for, if any."""
    path = Path(out_dir) / SUMMARY
    return json.loads(path.read_text()).get("trained_length") if path.exists() else None
