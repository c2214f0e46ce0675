"""Running a check script under Triton's CPU interpreter, for the tests of the Triton kernels."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def assert_passes_in_interpreter(script: str, timeout: int) -> None:
    """Run ``script`` in a fresh Python with ``TRITON_INTERPRET=1`` (Triton reads it at import, so
    it cannot be set inside this process) and require that it exits cleanly, printing ``ok`` last.
    Skipped where triton is not installed."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
