"""Passkey answers by phrasing and cue overlap, for results files written before trials recorded
them: each entry's prompts are drawn again from its ``config`` (the cell's seed and the
haystack; :func:`horizonlm.passkey.cell_prompts`), checked against the keys the file holds, and
its trials tabulated by the asked fact's phrasing and by its cue overlap (the bytes the
question's end shares with the text before the value; :func:`horizonlm.data.episodes.cue_overlap`).

    PYTHONPATH=src python bench/scripts/passkey_cue_overlap.py --source ../shared/data/novels \\
        --out bench/results/passkey_cue_overlap.json bench/results/passkey_tau_growth_h200_8min.json ...
"""

from __future__ import annotations

import argparse
import functools
import json
from collections import defaultdict
from dataclasses import fields
from pathlib import Path

from horizonlm.errors import HorizonError
from horizonlm.fileio import atomic_write_json, refuse_existing
from horizonlm.passkey import OVERLAP_BINS, PasskeyConfig, by_cue_overlap, cell_prompts, load_haystack, score


@functools.cache
def haystack_of(haystack: str, source: str) -> bytes:
    """The haystack text, read once for every entry that names the same file or corpus."""
    return load_haystack(PasskeyConfig(haystack=haystack, source=source))


def entry_trials(entry: dict, source: str) -> list[dict]:
    """The entry's cells with ``forms`` and ``cue_overlap`` filled in from its prompts drawn again."""
    known = {f.name for f in fields(PasskeyConfig)}
    cfg = PasskeyConfig(**{**{k: v for k, v in entry["config"].items() if k in known}, "source": source,
                           "progress": False})
    haystack = haystack_of(cfg.haystack, cfg.source)
    cells = []
    for cell in entry["cells"]:
        if cell["status"] != "ok":
            cells.append(cell)
            continue
        asked, _ = cell_prompts(haystack, cfg, cell["length"], cell["depth"])
        keys = [key for key, _ in cell["examples"]]
        if [p.key for p in asked] != keys:
            raise HorizonError(f"the prompts drawn again do not hold the file's keys at {cell['length']}, "
                               f"depth {cell['depth']}: another haystack or another prompt builder")
        cells.append({**cell, "forms": [p.form for p in asked], "cue_overlap": [p.overlap for p in asked]})
    return cells


def by_form(cells: list[dict]) -> list[dict]:
    """Trials grouped by the asked fact's phrasing (core | question), with its overlaps seen."""
    groups: dict[str, list[tuple[bool, int]]] = defaultdict(list)
    for cell in cells:
        if cell["status"] == "ok":
            for (key, reply), form, n in zip(cell["examples"], cell["forms"], cell["cue_overlap"]):
                groups[form].append((score(reply, key), n))
    return [{"form": form, "trials": len(won), "accuracy": sum(w for w, _ in won) / len(won),
             "cue_overlap": sorted({n for _, n in won})} for form, won in sorted(groups.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="passkey results files")
    parser.add_argument("--source", default="../shared/data/novels", help="the novels corpus the prompts were cut from")
    parser.add_argument("--out", required=True)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    out = refuse_existing(args.out, args.overwrite)
    entries, pooled = {}, defaultdict(list)
    for path in args.files:
        for name, entry in json.loads(Path(path).read_text())["models"].items():
            cells = entry_trials(entry, args.source)
            wording = entry["config"].get("wording", "benchmark")
            entries[f"{Path(path).name}: {name}"] = {"wording": wording, "keys": entry["keys"],
                                                     "by_cue_overlap": by_cue_overlap(cells), "by_form": by_form(cells)}
            pooled[(wording, entry["keys"])] += cells
            print(name, entries[f"{Path(path).name}: {name}"]["by_cue_overlap"], flush=True)
    atomic_write_json(out, {
        "what": "passkey trials of earlier results files by the asked fact's phrasing and cue overlap (bytes the "
                "question's end, with the answer's leading space, shares with the text before the value); prompts "
                "drawn again from each entry's config and checked against its keys",
        "overlap_bins": [list(b) for b in OVERLAP_BINS],
        "files": args.files,
        "pooled": [{"wording": w, "keys": k, "by_cue_overlap": by_cue_overlap(c), "by_form": by_form(c)}
                   for (w, k), c in pooled.items()],
        "entries": entries})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
