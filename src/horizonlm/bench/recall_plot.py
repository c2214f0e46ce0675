"""The figure of ``horizon bench recall``, drawn from every entry of the results file: rung 1
accuracy against width (one panel per test cell) and its hit rate against width; rung 2
accuracy and hit rate against the gap (dashed: the hit rate of a random read; dotted: how
often the read took the answer token's own entry, where every token writes one). Entries
measured on different devices (a GPU, this CPU) get panels of their own, titled by device:
their budgets differ, and one panel of both would compare what is not comparable."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from horizonlm.bench.common import save_figure


def series_name(entry: dict[str, Any]) -> str:
    """One line of a panel: the model and everything but the plotted variable."""
    name = f"{entry['model']} l{entry['layers']} {entry['filler']}"
    if entry["rung"] == 2:
        name += f" d{entry['width']}"
    return name + (f" [{entry['label']}]" if entry.get("label") else "")


def _by_series(entries: list[dict[str, Any]], point: Callable[[dict[str, Any]], list[tuple[float, float]]]
               ) -> dict[str, list[tuple[float, float]]]:
    """Points of every series, sorted along x; entries without a value contribute nothing."""
    lines: dict[str, list[tuple[float, float]]] = {}
    for entry in entries:
        lines.setdefault(series_name(entry), []).extend(p for p in point(entry) if p[1] is not None)
    return {k: sorted(v) for k, v in lines.items() if v}


def _rung1_cell(seq_len: int, pairs: int):
    """(width, accuracy) of one test cell."""
    def point(entry: dict[str, Any]) -> list[tuple[float, float]]:
        return [(entry["width"], c["accuracy"]) for c in entry["cells"]
                if c["seq_len"] == seq_len and c["pairs"] == pairs]
    return point


def _rung1_hits(entry: dict[str, Any]) -> list[tuple[float, float]]:
    """(width, hit rate averaged over the cells that have one)."""
    rates = [c["hit_rate"] for c in entry["cells"] if c.get("hit_rate") is not None]
    return [(entry["width"], sum(rates) / len(rates))] if rates else []


def _rung2(key: str):
    """(gap, value of ``key``) of every cell that ran."""
    def point(entry: dict[str, Any]) -> list[tuple[float, float]]:
        return [(c["gap"], c.get(key)) for c in entry["cells"] if c["status"] == "ok"]
    return point


def _device(entry: dict[str, Any]) -> str:
    """Where an entry was measured, as its environment records it."""
    return str(entry.get("environment", {}).get("device") or "unknown device")


def _panels(entries: list[dict[str, Any]]) -> list[tuple[str, str, str, Any, Any, Any]]:
    """(title, x label, y label, series, dashed series, dotted series) of every panel that has
    data, the panels of each device together."""
    panels = []
    for device in sorted({_device(e) for e in entries}):
        rung1 = [e for e in entries if e["rung"] == 1 and _device(e) == device]
        rung2 = [e for e in entries if e["rung"] == 2 and _device(e) == device]
        for seq_len, pairs in sorted({(c["seq_len"], c["pairs"]) for e in rung1 for c in e["cells"]}):
            panels.append((f"{device}, rung 1: L={seq_len}, {pairs} pairs", "width", "accuracy",
                           _by_series(rung1, _rung1_cell(seq_len, pairs)), {}, {}))
        if rung1:
            panels.append((f"{device}, rung 1: retrieval hit rate", "width", "hit rate (mean over cells)",
                           _by_series(rung1, _rung1_hits), {}, {}))
        if rung2:
            panels.append((f"{device}, rung 2: cross-window recall", "gap (tokens)", "accuracy",
                           _by_series(rung2, _rung2("accuracy")), {}, {}))
            panels.append((f"{device}, rung 2: retrieval hit rate", "gap (tokens)", "hit rate",
                           _by_series(rung2, _rung2("hit_rate")), _by_series(rung2, _rung2("hit_chance")),
                           _by_series(rung2, _rung2("entry_hit_rate"))))
    return panels


def _tick_label(x: float) -> str:
    """1024 -> '1K', 1048576 -> '1M', 64 -> '64': gaps and widths as a reader says them."""
    for size, unit in ((1 << 20, "M"), (1 << 10, "K")):
        if x >= size and x % size == 0:
            return f"{int(x) // size}{unit}"
    return str(int(x))


def plot_recall(results: dict[str, Any], path: Path) -> None:
    """One panel per rung-1 test cell and per rung-2 measure, up to four panels a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(list(results["entries"].values()))
    columns = max(1, min(4, len(panels)))
    rows = max(1, -(-len(panels) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, xlabel, ylabel, lines, dashed, dotted) in zip(axes.flat, panels):
        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)  # up to 20 series before a colour repeats
        for name, points in lines.items():
            drawn = ax.plot(*zip(*points), marker="o", label=name)
            if name in dashed:
                ax.plot(*zip(*dashed[name]), linestyle="--", color=drawn[0].get_color(), alpha=0.6)
            if name in dotted:
                ax.plot(*zip(*dotted[name]), linestyle=":", marker="x", color=drawn[0].get_color())
        xs = [x for points in lines.values() for x, _ in points]
        if xs and min(xs) > 0:
            ax.set_xscale("log", base=2 if xlabel == "width" else 10)
            ax.set_xticks(sorted(set(xs)), [_tick_label(x) for x in sorted(set(xs))])
            ax.minorticks_off()
        elif xs:
            ax.set_xscale("symlog", linthresh=1)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel, ylim=(-0.02, 1.02))
        ax.grid(True, alpha=0.3)
        if lines:
            ax.legend(fontsize=6)
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no entries yet", ha="center", va="center")
    fig.tight_layout()
    save_figure(fig, path)
