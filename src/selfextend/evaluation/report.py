"""Tables (Markdown) and plots (PNG) from ``results.jsonl``; nothing here runs a model."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .experiments import load_results
from .methods import ALL_METHODS
from .render import Panel, markdown_table, new_figure, save_line_plots


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def _methods(records):
    """Method specs present, in the order of ALL_METHODS (a kind's fixed-G variants after it)."""
    present = {r["trial"]["method"] for r in records}
    return sorted(present, key=lambda spec: (ALL_METHODS.index(spec.split(":")[0]), spec))


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
    return methods, lengths, [[m] + [_mean([r[field] for r in cells.get((m, n), [])]) for n in lengths]
                              for m in methods]


def _curves(path: Path, lengths, methods, rows, L: int, **axes) -> None:
    """One line per method (``rows[i][1:]`` over ``lengths``), the trained length marked."""
    lines = {m: (lengths, row[1:]) for m, row in zip(methods, rows)}
    save_line_plots(path, [Panel(lines, axes, mark_x=(L, f"trained length {L}"))])


def passkey_section(records, out_dir: Path, L: int) -> str:
    table = _per_length(records, "passkey", "score")
    if table is None:
        return ""
    methods, lengths, rows = table
    _curves(out_dir / "passkey.png", lengths, methods, rows, L, xlabel="prompt length (tokens)",
            ylabel="passkey accuracy", ylim=(-0.05, 1.05), title="Passkey retrieval")
    n_trials = sum(r["trial"]["experiment"] == "passkey" for r in records)
    return ("## Passkey retrieval\n\nAccuracy over depths and keys (" + f"{n_trials} trials).\n\n"
            + markdown_table(["method"] + [str(n) for n in lengths], rows) + "\n\n![passkey](passkey.png)\n")


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
    _, _, rows = _per_length(records, experiment, "score")
    return (f"## {title}\n\nMean score over depths (1 = answer found).\n\n"
            + markdown_table(["method"] + [str(n) for n in lengths], rows) + f"\n\n![{experiment}]({experiment}.png)\n")


def keylength_section(records) -> str:
    cells = _by(records, "keylength", "method", "key")
    if not cells:
        return ""
    methods = _methods([r for g in cells.values() for r in g])
    keys = sorted({k[1] for k in cells}, key=len)
    length = next(iter(cells.values()))[0]["trial"]["length"]
    rows = [[m] + [("yes" if cells[(m, k)][0]["score"] else "no") if (m, k) in cells else "-" for k in keys]
            for m in methods]
    return (f"## Passkey with longer keys (length {length}, depth 0.5)\n\n"
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
            plain = _mean([r[field_] for r in cells.get(("plain", n), [])])
            for m in _methods([r for g in cells.values() for r in g]):
                if m != "plain" and (m, n) in cells:
                    value = _mean([r[field_] for r in cells[(m, n)]])
                    rows.append([exp, n, m, plain, value, value - plain])
    if not rows:
        return ""
    return (f"## Short context (length <= trained {L})\n\nSelfExtend with G chosen from the length, and the rope "
            "scaling baselines (factor 1 here), must equal the plain model; a fixed G > 1, rerope and leaky regroup "
            "distances beyond w and need not.\n\n"
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
    return (f"Compute: {len(records)} trials, {total / 3600:.2f} h in all (sum of trial times).\n\n"
            + markdown_table(["experiment", "trials", "minutes", "lengths"], rows) + "\n\n")


def write_report(out_dir: Path, L: int, header: str = "", records: list[dict] | None = None) -> Path:
    """Write ``report.md`` (and the PNGs it shows) from ``records`` (default: read ``results.jsonl``);
    return its path."""
    out_dir = Path(out_dir)
    if records is None:
        records = list(load_results(out_dir / "results.jsonl").values())
    sections = [passkey_section(records, out_dir, L), keylength_section(records),
                heatmap_section(records, out_dir, "needle", "Needle in a haystack (Paul Graham essays)"),
                perplexity_section(records, out_dir, L), short_context_section(records, L),
                ablation_section(records, out_dir)]
    path = out_dir / "report.md"
    path.write_text(header + budget_section(records) + "\n\n".join(s for s in sections if s))
    (out_dir / "summary.json").write_text(json.dumps({"trials": len(records), "trained_length": L}, indent=1))
    return path
