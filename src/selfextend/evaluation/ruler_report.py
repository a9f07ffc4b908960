"""The RULER section of ``report.md``: a summary per method and length (RULER's average over tasks with
a 95% interval, and each method's effective length) and the table task x length x method.

Cells are ``k/n``: questions answered with every expected value, out of questions asked, with the 95%
Wilson interval of that fraction. The average per method and length is RULER's: the mean over tasks of
each task's mean ``string_match_all`` score (the fraction of expected values found; equal to k/n for
one-value tasks); its interval is the Wilson interval of the summed scores over the questions, which is
wider than the true one for fractional scores (their variance is at most the binomial's). Questions of
one haystack share its prefix, so they are not independent: the intervals are a lower bound on the
uncertainty.

Each length's averages are over the questions every method run at that length has answered, on the tasks
that also have such questions at the shortest length (all of them once a run is complete; fewer while it
runs, and the report says which are left out), so every method of a column answers the same questions.
Effective length (RULER's notion, with this model's own bar): the longest length up to which, at every
measured length, the upper end of the method's average interval reaches the plain model's average at the
shortest length (the model within its trained context) on the same tasks.

Per family: each family's average per method and length over its tasks measured for every method at that
length, and how SelfExtend compares with each peer there: "leads" or "loses" only when the two 95%
intervals do not overlap, else "ties" (with 10-30 questions a cell, most differences are ties).
"""

from __future__ import annotations

from collections import Counter, defaultdict

from .methods import parse_method, selfextend_method
from .render import markdown_table
from .ruler_runner import LONG_PROMPT, PREFILL_CHUNK

FAMILY_ORDER = ["single needle", "multi-key", "multi-value", "multi-query", "variable tracking", "common words",
                "frequent words"]


def _wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    from .report import wilson_interval

    return wilson_interval(k, n, z)


def _cells(records):
    cells = defaultdict(list)
    for r in records:
        t = r["trial"]
        if t["experiment"] == "ruler":
            cells[(t["method"], t["length"], t["task"])].append(r)
    return cells


def _question(trial: dict) -> tuple:
    """A question's identity across methods: its trial without the method."""
    return tuple(sorted((k, v) for k, v in trial.items() if k != "method"))


def on_shared_questions(records, methods) -> tuple[list, dict]:
    """The RULER records of ``methods`` on the questions that every one of them run at that length has
    answered, and {(task, length): (fewest, most) questions a method has there} for the cells where some
    answered questions were left out (a run stopped or still going between methods)."""
    ruler = [r for r in records if r["trial"]["experiment"] == "ruler" and r["trial"]["method"] in methods]
    asked = defaultdict(lambda: defaultdict(set))  # length -> method -> question keys
    for r in ruler:
        asked[r["trial"]["length"]][r["trial"]["method"]].add(_question(r["trial"]))
    common = {n: set.intersection(*by.values()) for n, by in asked.items()}
    kept = [r for r in ruler if _question(r["trial"]) in common[r["trial"]["length"]]]
    shared = Counter((dict(q)["task"], n) for n, qs in common.items() for q in qs)  # (task, length) -> questions
    most = defaultdict(int)  # (task, length) -> the most questions one method has answered there
    for (_, n, t), rs in _cells(ruler).items():
        most[(t, n)] = max(most[(t, n)], len(rs))
    partial = {cell: (shared[cell], k) for cell, k in most.items() if shared[cell] < k}
    return kept, partial


def averages(records) -> dict:
    """(method, length) -> (average score, low, high, tasks, questions) over the tasks measured."""
    cells = _cells(records)
    per = defaultdict(dict)
    for (m, n, task), rs in cells.items():
        per[(m, n)][task] = rs
    out = {}
    for key, tasks in per.items():
        means = [sum(r["score"] for r in rs) / len(rs) for rs in tasks.values()]
        total = sum(len(rs) for rs in tasks.values())
        summed = sum(r["score"] for rs in tasks.values() for r in rs)
        lo, hi = _wilson(summed, total)
        out[key] = (sum(means) / len(means), lo, hi, len(tasks), total)
    return out


def measured_at(cells, methods, n: int) -> list[str]:
    """The ``methods`` with any task at length ``n`` (one not run there at all does not narrow the others)."""
    return [m for m in methods if any(k[0] == m and k[1] == n for k in cells)]


def family_averages(records, methods, lengths) -> dict:
    """(family, method, length) -> (average score, low, high, questions) over the family's tasks that
    every method measured at that length has there (so all methods of one row answer the same questions)."""
    from .ruler import TASKS

    cells = _cells(records)
    out = {}
    for family in FAMILY_ORDER:
        for n in lengths:
            at = measured_at(cells, methods, n)
            shared = {t for (_, k, t) in cells
                      if k == n and TASKS[t].family == family and all((m, n, t) in cells for m in at)}
            if not shared:
                continue
            on = averages([r for m in at for t in shared for r in cells[(m, n, t)]])
            for m in at:
                average, low, high, _, questions = on[(m, n)]
                out[(family, m, n)] = (average, low, high, questions)
    return out


def compare(a: tuple, b: tuple) -> str:
    """'leads', 'loses' or 'ties': ``a`` against ``b``, each (average, low, high, ...), by interval overlap."""
    if a[1] > b[2]:
        return "leads"
    if a[2] < b[1]:
        return "loses"
    return "ties"


def family_section(records, methods, lengths, ours: str, peers: list[str]) -> str:
    """Family x length rows: each method's average (in %), then ``ours`` against each of ``peers``."""
    fam = family_averages(records, methods, lengths)
    peers = [p for p in peers if p in methods and p != ours]
    rows = []
    for family in FAMILY_ORDER:
        for n in lengths:
            at = [m for m in methods if (family, m, n) in fam]
            if not at:
                continue
            row = [family, n, fam[(family, at[0], n)][3]]
            row += [f"{100 * fam[(family, m, n)][0]:.0f}" if m in at else "-" for m in methods]
            if ours in methods:
                row += [compare(fam[(family, ours, n)], fam[(family, p, n)]) if ours in at and p in at else "-"
                        for p in peers]
            rows.append(row)
    if not rows:
        return ""
    versus = [f"{ours} vs {p}" for p in peers] if ours in methods else []
    return markdown_table(["family", "length", "questions"] + methods + versus, rows)


def effective_length(avg: dict, method: str, lengths: list[int], bars: dict[int, float]) -> str:
    """The longest length up to which every average of ``method`` reaches that length's bar within its
    interval; a length it was not run at ends the scan (">= " the last one it reached)."""
    best = None
    for n in lengths:
        cell = avg.get((method, n))
        if cell is None:
            return "-" if best is None else f">= {best}"
        if cell[2] < bars[n]:
            break
        best = n
    if best is None:
        return f"< {lengths[0]}"
    return f">= {best}" if best == lengths[-1] else str(best)


def ruler_section(records, methods_order) -> str:
    """The Markdown section (empty if no RULER records)."""
    from .ruler import TASKS

    cells = _cells(records)
    if not cells:
        return ""
    every = [m for m in methods_order if any(k[0] == m for k in cells)]
    # the averages and families compare the methods as run by default; other SelfExtend settings (a study,
    # often on one task) show in the per-task table only, and do not narrow the tasks the others share
    ours = selfextend_method().spec
    methods = [m for m in every if parse_method(m).name != "selfextend" or m == ours]
    studied = [m for m in every if m not in methods]
    lengths = sorted({k[1] for k in cells})
    tasks = sorted({k[2] for k in cells}, key=lambda t: (FAMILY_ORDER.index(TASKS[t].family), t))
    ruler, partial = on_shared_questions(records, methods)  # every method of a length on the same questions
    answered = _cells(ruler)
    first = lengths[0]
    at = {n: measured_at(answered, methods, n) for n in lengths}
    shared = {n: {t for t in tasks if all((m, k, t) in answered for m in at[n] for k in (first, n))}
              for n in lengths}
    avg, bars = {}, {}
    for n in lengths:  # each length on the tasks it shares with the first; the bar is plain's there, on those
        on = averages([r for r in ruler if r["trial"]["task"] in shared[n] and r["trial"]["length"] in (first, n)])
        avg.update({(m, k): v for (m, k), v in on.items() if k == n})
        if ("plain", first) in on:
            bars[n] = on[("plain", first)][0]
    rows = []
    for m in methods:
        row = [m]
        for n in lengths:
            a = avg.get((m, n))
            row.append("-" if a is None else f"{100 * a[0]:.1f} [{100 * a[1]:.0f}-{100 * a[2]:.0f}] ({a[4]} q)")
        row.append(effective_length(avg, m, lengths, bars) if len(bars) == len(lengths) else "-")
        rows.append(row)
    summary = markdown_table(["method"] + [f"{n} ({len(shared[n])} tasks)" for n in lengths] + ["effective length"],
                             rows)
    complete = {t for t in tasks if all(t in shared[n] for n in lengths)}
    detail = []
    for t in tasks:
        for n in lengths:
            row = [t, TASKS[t].family, n]
            for m in every:
                rs = cells.get((m, n, t), [])
                if not rs:
                    row.append("-")
                    continue
                k = sum(r["score"] >= 1 for r in rs)
                lo, hi = _wilson(k, len(rs))
                row.append(f"{k}/{len(rs)} [{100 * lo:.0f}-{100 * hi:.0f}]")
            detail.append(row)
    families = family_section(ruler, methods, lengths, ours, ["string", "dca"])
    missing = [t for t in tasks if t not in complete]
    note = (f"\n\nTasks not yet measured for every method at every length (left out of the averages of the "
            f"lengths that lack them): {', '.join(missing)}." if missing else "")
    if partial:
        cut = ", ".join(f"{t} at {n} ({few} of {most})" for (t, n), (few, most) in sorted(partial.items()))
        note += (f"\n\nQuestions answered by some methods but not yet by all, left out of the averages (questions "
                 f"every method has, of the most one has): {cut}.")
    if studied:
        note += (f"\n\nOther SelfExtend settings, measured where the per-task table shows them (not averaged): "
                 f"{', '.join(studied)}.")
    bar_text = f"{100 * bars[first]:.1f}" if first in bars else "-"
    return ("## RULER (synthetic tasks)\n\n"
            "RULER's tasks generated offline (`selfextend.evaluation.ruler`), scored as RULER scores them; one "
            f"prefill per haystack and method (past {LONG_PROMPT} tokens in chunks of {PREFILL_CHUNK}, but dynamic "
            "NTK), each question asked from a copy of the KV cache. Average: RULER's score in % (mean over the tasks "
            "of each task's mean string_match_all; at each length, the questions every method run there has "
            "answered, on the tasks also measured at the first length), 95% interval in brackets, questions in "
            "parentheses. Effective length: the longest length up to which the interval reaches the plain model's "
            f"average at {first} tokens on the same tasks ({bar_text} on all of them).\n\n"
            + summary + note
            + ("\n\nPer task family (average score in %; every method on the same questions; SelfExtend against each "
               "peer: leads or loses only where the 95% intervals do not overlap):\n\n" + families if families else "")
            + "\n\nPer task (questions answered with every expected value / questions, 95% Wilson "
            "interval in %):\n\n" + markdown_table(["task", "family", "length"] + every, detail) + "\n")
