"""Whether to draw progress bars: tqdm's escape codes belong on a terminal, not in a piped log."""

from __future__ import annotations

import sys


def show_bars(progress: bool | None) -> bool:
    """``progress`` when it is given (``--progress`` forces bars, ``--no-progress`` turns them
    off); by default (None) bars only when stderr, where tqdm draws them, is a terminal."""
    if progress is not None:
        return progress
    return sys.stderr.isatty()
