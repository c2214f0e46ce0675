"""The figure of ``horizon bench headroom``: one panel a reset window, what carrying the state
earns each checkpoint (dashed) and what the far cache adds on top of its carried score (points),
against how far back the cache may look."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from horizonlm.bench.common import save_figure


def plot_headroom(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = list(result["windows"])
    fig, axes = plt.subplots(1, len(windows), figsize=(5.5 * len(windows), 4.2), squeeze=False)
    for ax, w in zip(axes[0], windows):
        checkpoints = result["windows"][w]["checkpoints"]
        for i, (ckpt, by_reach) in enumerate(checkpoints.items()):
            reaches = _by_reach(by_reach)
            name, color = Path(ckpt).name, f"C{i % 10}"
            ax.plot(range(len(reaches)), [by_reach[r]["carried"]["cache_mixture_gain"] for r in reaches], "o-",
                    color=color, label=f"{name}: cache on top of carried")
            ax.axhline(by_reach[reaches[0]]["carried_minus_reset"]["all"], color=color, ls="--", lw=1,
                       label=f"{name}: carried minus reset")
        reaches = _by_reach(result["windows"][w]["cache_alone"])
        ax.set_xticks(range(len(reaches)), [r if r == "book" else f"{int(r) // 1024}K" for r in reaches])
        ax.set_title(f"reset every {w} bytes", fontsize=10)
        ax.set_xlabel("how far back the cache looks (bytes)")
        ax.set_ylabel("bits/byte")
        ax.grid(alpha=0.3)
        if checkpoints:
            ax.legend(fontsize=6, loc="upper left")
    fig.suptitle("a far n-gram cache of each test book mixed into checkpoints\n(weights fitted on the other books)",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def _by_reach(reaches: dict) -> list[str]:
    """The reaches nearest first, ``book`` last: a results file read back from JSON may hold its keys
    sorted as text (16K, 512K, 64K)."""
    return sorted(reaches, key=lambda r: (r == "book", int(r) if r != "book" else 0))
