"""``horizon bench merge``: a union of results files by entry name, never a silent replacement."""

from __future__ import annotations

import json
from pathlib import Path

from horizonlm.cli import main


def _write(path: Path, models: dict, **top) -> str:
    path.write_text(json.dumps({"models": models, "environment": {"git_commit": path.stem}, **top}))
    return str(path)


def _entry(bits: float) -> dict:
    return {"loss_curve": [[1.0, 2.0]], "scores": {"novels_test_carried": {"bits_per_byte": bits}}}


def test_merge_keeps_every_entry_and_where_it_came_from(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.json", {"horizon": _entry(1.6)}, sweeps={"horizon": [{"lr": 0.001}]})
    b = _write(tmp_path / "b.json", {"horizon_no_memory": _entry(1.7)})
    out = tmp_path / "merged.json"
    assert main(["bench", "merge", "--inputs", f"{a},{b}", "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert merged["models"] == {"horizon": _entry(1.6), "horizon_no_memory": _entry(1.7)}
    assert merged["sweeps"] == {"horizon": [{"lr": 0.001}]}
    assert [m["file"] for m in merged["merged_from"]] == [a, b]
    assert merged["merged_from"][1]["environment"] == {"git_commit": "b"}
    assert out.with_suffix(".png").is_file()


def test_merge_refuses_what_would_lose_or_mix_measurements(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.json", {"horizon": _entry(1.6)})
    again = _write(tmp_path / "again.json", {"horizon": _entry(1.5)})
    other = _write(tmp_path / "other.json", {"x": _entry(1.5)}, protocol={"name": "h200-8min"})
    out = tmp_path / "merged.json"
    assert main(["bench", "merge", "--inputs", f"{a},{again}", "--out", str(out)]) == 2  # one name, two values
    assert main(["bench", "merge", "--inputs", f"{a},{other}", "--out", str(out)]) == 2  # two protocols
    assert main(["bench", "merge", "--inputs", f"{a},{tmp_path / 'missing.json'}", "--out", str(out)]) == 2
    assert main(["bench", "merge", "--inputs", f"{a},{again}", "--out", a]) == 2  # an input is never the output
    assert not out.exists()
    out.write_text("{}")
    b = _write(tmp_path / "b.json", {"y": _entry(1.7)})
    assert main(["bench", "merge", "--inputs", f"{a},{b}", "--out", str(out)]) == 2  # exists, no --overwrite
    assert out.read_text() == "{}"
    assert main(["bench", "merge", "--inputs", f"{a},{b}", "--out", str(out), "--overwrite"]) == 0
    assert json.loads(Path(a).read_text())["models"] == {"horizon": _entry(1.6)}  # inputs untouched


def test_merge_keeps_once_what_two_calls_carried_from_one_file(tmp_path: Path) -> None:
    """Two device calls started from the same results file both carry its entries and records."""
    shared = {"horizon": _entry(1.6)}
    renamed = {"session 17": {"horizon_tau_growth": "horizon"}}
    a = _write(tmp_path / "a.json", {**shared, "x": _entry(1.5)}, renamed_entries=renamed)
    b = _write(tmp_path / "b.json", {**shared, "y": _entry(1.7)}, renamed_entries=renamed)
    out = tmp_path / "merged.json"
    assert main(["bench", "merge", "--inputs", f"{a},{b}", "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert merged["models"] == {"horizon": _entry(1.6), "x": _entry(1.5), "y": _entry(1.7)}
    assert merged["renamed_entries"] == renamed
    c = _write(tmp_path / "c.json", {"z": _entry(1.8)}, renamed_entries={"session 18": {}})
    assert main(["bench", "merge", "--inputs", f"{a},{c}", "--out", str(tmp_path / "m2.json")]) == 2
    assert not (tmp_path / "m2.json").exists()
