"""Markdown tables and PNG line plots, shared by the evaluation report and the benchmark.

Figures are built with ``matplotlib.figure.Figure`` and saved directly: no pyplot, so nothing sets a
backend or keeps global figure state (importing this module does not import matplotlib at all).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MARKERS = ("o", "s", "^", "v", "D", "x", "*", "P")


def markdown_table(header: list[str], rows: list[list], align: str = "") -> str:
    """A Markdown table; floats are shown with 3 significant digits. ``align`` has one letter per
    column, ``l`` or ``r`` (default: all left)."""
    def cell(x) -> str:
        return "-" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)

    rule = "".join("---:|" if a == "r" else "---|" for a in align.ljust(len(header), "l"))
    lines = ["| " + " | ".join(header) + " |", "|" + rule]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def new_figure(width: float, height: float):
    """An empty matplotlib Figure (not registered with pyplot: nothing to close)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


@dataclass
class Panel:
    """One set of axes: a line per label over x, plus what ``Axes.set`` takes (title, labels, scales)."""
    lines: dict[str, tuple[list, list]]            # label -> (xs, ys); points whose y is None are left out
    axes: dict = field(default_factory=dict)       # e.g. title=, xlabel=, ylabel=, xscale="log", ylim=(0, 1)
    xticks: list | None = None                     # label exactly these x values
    mark_x: tuple[float, str] | None = None        # a dashed vertical line at x, with its legend label
    grid: bool = False
    intervals: dict[str, tuple[list, list]] = field(default_factory=dict)  # label -> (lows, highs): error bars
    dodge: float = 0.0                             # shift line i by x * dodge * (i - middle), so bars stay apart


def save_line_plots(path: Path, panels: list[Panel], panel_size: tuple[float, float] = (6, 4), dpi: int = 120) -> None:
    """Draw ``panels`` side by side in one figure and save it as a PNG at ``path``."""
    fig = new_figure(panel_size[0] * len(panels), panel_size[1])
    for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        middle = (len(panel.lines) - 1) / 2
        for i, ((label, (xs, ys)), marker) in enumerate(zip(panel.lines.items(), MARKERS * 4)):
            lows, highs = panel.intervals.get(label, (ys, ys))
            points = [(x * (1 + panel.dodge * (i - middle)), y, lo, hi)
                      for x, y, lo, hi in zip(xs, ys, lows, highs) if y is not None]
            px, py = [p[0] for p in points], [p[1] for p in points]
            if label in panel.intervals:  # asymmetric error bars from (low, high)
                yerr = [[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]]
                ax.errorbar(px, py, yerr=yerr, marker=marker, label=label, capsize=2, elinewidth=1)
            else:
                ax.plot(px, py, marker=marker, label=label)
        if panel.mark_x is not None:
            ax.axvline(panel.mark_x[0], color="gray", ls="--", lw=1, label=panel.mark_x[1])
        ax.set(**panel.axes)
        if panel.xticks is not None:
            ax.set_xticks(panel.xticks, [str(x) for x in panel.xticks])
            ax.set_xticks([], minor=True)
        if panel.grid:
            ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
