"""Which key could find a passkey stated in other words: idealised keys scored on real prompts,
no model involved.

Every byte t of a prompt writes an entry whose context is the bytes before it; the query at the
answer's first byte (the space after the question) looks for the entry of the asked value's first
digit. Three exact keys rank the entries against the query:

- ``ordered``: the length of the common suffix, capped at 16 bytes (the best the default 16-byte
  induction key can do: an exact n-gram match);
- ``bagW``: the cosine of the counts of byte trigrams over the last W bytes, order ignored (a key
  that names the label and the kind wherever they stand);
- ``bothW``: ordered / 16 + bagW.

For each wording and length, the share of prompts where the fact's entry ranks first (no other
entry scores as high) and within the top 8 (fewer than 8 others score as high).

    PYTHONPATH=src python bench/scripts/cue_key_probe.py --source ../shared/data/novels \\
        --out bench/results/cue_key_probe.json
"""

from __future__ import annotations

import argparse
import math
import random
from collections import Counter

import numpy as np

from horizonlm.fileio import atomic_write_json, refuse_existing
from horizonlm.passkey import (OVERLAP_BINS, PasskeyConfig, build_prompt, digit_positions, load_haystack,
                               overlap_bin)

SPAN = 16
"""The ordered key's span (the default ``memory_key_span``)."""


def ordered_scores(text: np.ndarray, cue: np.ndarray) -> np.ndarray:
    """For every entry t (context ``text[:t]``), its common suffix with ``cue``, capped at SPAN. (T,)"""
    n = len(text)
    scores = np.zeros(n, dtype=np.int64)  # (T,)
    alive = np.ones(n, dtype=bool)  # (T,)
    for j in range(SPAN):
        at = np.arange(n) - 1 - j  # (T,)
        same = (at >= 0) & (text[np.maximum(at, 0)] == cue[-1 - j])  # (T,)
        alive &= same
        scores += alive
    return scores


def trigrams(data: bytes) -> list[bytes]:
    return [data[i : i + 3] for i in range(len(data) - 2)]


def bag_scores(text: bytes, cue: bytes, width: int) -> np.ndarray:
    """For every entry t, the cosine of trigram counts over ``text[t-width:t]`` and the cue's last
    ``width`` bytes (kept up to date as the window slides). (T,)"""
    query = Counter(trigrams(cue[-width:]))
    query_norm = math.sqrt(sum(c * c for c in query.values()))
    window: Counter = Counter()
    dot = squares = 0
    scores = np.zeros(len(text))  # (T,)

    def change(gram: bytes, by: int) -> None:
        nonlocal dot, squares
        old = window[gram]
        window[gram] = old + by
        squares += (old + by) ** 2 - old ** 2
        dot += by * query.get(gram, 0)

    for t in range(len(text)):  # the window of t holds the trigrams starting at t-width .. t-3
        if t >= 3:
            change(text[t - 3 : t], 1)
        if t - width - 1 >= 0:
            change(text[t - width - 1 : t - width + 2], -1)
        scores[t] = dot / (math.sqrt(squares) * query_norm) if squares else 0.0
    return scores


def rank_of(scores: np.ndarray, target: int, visible: int) -> int:
    """How many other visible entries score at least as high as the target."""
    others = np.delete(scores[:visible], target)
    return int((others >= scores[target]).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="../shared/data/novels")
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--widths", default="32,48,64", help="bytes the bag key counts trigrams over")
    parser.add_argument("--out", required=True)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    out = refuse_existing(args.out, args.overwrite)
    haystack = load_haystack(PasskeyConfig(source=args.source))
    widths = [int(w) for w in args.widths.split(",")]
    bins = [overlap_bin(low) for low, _ in OVERLAP_BINS]
    rows = []
    for wording in ("benchmark", "heldout", "train"):
        for length in map(int, args.lengths.split(",")):
            rng = random.Random(f"probe-{wording}-{length}")
            ranks: dict[str, list[tuple[int, int]]] = {"ordered": []}
            for _ in range(args.trials):
                prompt = build_prompt(haystack, length, rng.choice((0, 50, 100)), 1, rng, wording)
                cue = prompt.text + b" "
                target = digit_positions(prompt.text, prompt.key)[0]
                text = np.frombuffer(prompt.text, dtype=np.uint8)  # (T,)
                ordered = ordered_scores(text, np.frombuffer(cue, dtype=np.uint8)) / SPAN  # (T,)
                keys = {"ordered": ordered}
                for width in widths:
                    bag = bag_scores(prompt.text, cue, width)  # (T,)
                    keys[f"bag{width}"], keys[f"both{width}"] = bag, ordered + bag
                for name, scores in keys.items():
                    ranks.setdefault(name, []).append((rank_of(scores, target, prompt.question_at), prompt.overlap))
            for name, got in ranks.items():
                row = {"wording": wording, "length": length, "key": name, "trials": len(got),
                       "first": sum(r == 0 for r, _ in got) / len(got), "top8": sum(r < 8 for r, _ in got) / len(got)}
                row["top8_by_cue_overlap"] = {  # bin: [in the top 8, trials]
                    name: [sum(r < 8 for r, n in got if overlap_bin(n) == name),
                           sum(overlap_bin(n) == name for _, n in got)]
                    for name in bins}
                rows.append(row)
                print(wording, length, name, f"first {row['first']:.0%}, top 8 {row['top8']:.0%}", flush=True)
    atomic_write_json(out, {"what": __doc__.split("\n\n")[0], "widths": args.widths, "span": SPAN,
                            "trials": args.trials, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
