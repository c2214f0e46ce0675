"""Gather entries of several ``horizon passkey`` results files into one (and re-plot it): the
GPU scripts write one file per model and call, the repository keeps one per question.

    python bench/scripts/merge_passkey.py --out bench/results/passkey.json \
        --take 'A.json:horizon-read1 (1 key)=horizon pair, top-1 read (1 key)@7cae379' ...

Each ``--take`` is FILE:ENTRY[=NEW NAME][@COMMIT]; ``@COMMIT`` corrects the commit recorded in
the entry's environment (a device copy whose .git is not the code that ran), keeping the old one
in ``git_commit_recorded``. An existing ``--out`` is kept unless ``--replace`` is given.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from horizonlm.errors import HorizonError
from horizonlm.fileio import atomic_write_json, existing_file
from horizonlm.passkey import plot_passkey, read_results

TAKE = re.compile(r"^(?P<file>[^:]+):(?P<entry>[^=@]+)(?:=(?P<name>[^@]+))?(?:@(?P<commit>[0-9a-f]{7,40}))?$")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="results file to write (its PNG beside it)")
    p.add_argument("--take", action="append", required=True, help="FILE:ENTRY[=NEW NAME][@COMMIT]")
    p.add_argument("--note", action="append", default=[], help="a line for the file's notes")
    p.add_argument("--replace", action="store_true", help="overwrite an existing --out")
    args = p.parse_args()
    if Path(args.out).exists() and not args.replace:
        p.error(f"{args.out} exists; pass --replace to overwrite it")
    models = {}
    for take in args.take:
        match = TAKE.match(take)
        if match is None:
            p.error(f"--take {take!r} is not FILE:ENTRY[=NEW NAME][@COMMIT]")
        try:  # the passkey bench's own reader: a missing file or one that is not results is an error
            source = read_results(existing_file(match["file"], "--take"), "--take")["models"]
        except HorizonError as err:
            p.error(str(err))
        if match["entry"] not in source:
            p.error(f"{match['file']} has no entry {match['entry']!r} (it has {sorted(source)})")
        entry = dict(source[match["entry"]])
        if match["commit"]:
            env = dict(entry["environment"])
            env["git_commit_recorded"], env["git_commit"] = env.get("git_commit"), match["commit"]
            entry["environment"] = env
        models[match["name"] or match["entry"]] = entry
    results = {"models": models, "notes": args.note}
    atomic_write_json(args.out, results)
    plot_passkey(results, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}: {len(models)} entries")


if __name__ == "__main__":
    main()
