"""The table a quality results file supports: per model, each score over its seeds (mean, min,
max, spread), and the ranking on the main score with whether each gap exceeds the seed spread.

An entry ``MODEL-seedS`` is a second run of ``MODEL`` with another seed (``bench quality --seed``).
A gap between two models counts as a ranking only where it is larger than the spread of either
model's seeds; with one seed there is no spread to compare against, and the table says so rather
than calling a gap real. Cold starts recorded start by start are paired with the default's
(``cold_starts_paired``): the first bytes after a start are too few to compare two means apart.
A baseline or peer with fewer parameters than the default is named (``fewer_parameters_than_default``):
comparisons give every other model at least ours (the ablations, ``horizon_*``, lose parts by design).
"""

from __future__ import annotations

import re
import statistics
from typing import Any

SEED_SUFFIX = re.compile(r"-seed\d+$")


def score_value(score: dict[str, Any]) -> float | None:
    """A score's number: bits per byte, or word perplexity where that is what it measured."""
    return score.get("bits_per_byte", score.get("word_perplexity"))


def summarize_quality(results: dict[str, Any]) -> dict[str, Any]:
    """Per model and score: seeds, mean, min, max, spread (max - min); then the ranking by the
    mean of the main score (the test split scored with the state carried, or, for a model that
    carries none, its only test score) with each gap to the next model and whether it exceeds
    both models' spreads."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for name, entry in results.get("models", {}).items():
        groups.setdefault(SEED_SUFFIX.sub("", name), []).append(entry)
    models: dict[str, Any] = {}
    for model, entries in groups.items():
        names = sorted({key for entry in entries for key in entry.get("scores", {})})
        scores = {}
        for key in names:
            values = [v for v in (score_value(e["scores"][key]) for e in entries if key in e.get("scores", {}))
                      if v is not None]
            if values:
                scores[key] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
                               "spread": max(values) - min(values), "runs": len(values)}
        models[model] = {"seeds": sorted(e.get("seed", 0) for e in entries),
                         "steps": [e.get("steps") for e in entries], "scores": scores,
                         "parameters": sorted({e["parameters"] for e in entries if e.get("parameters")})}
    main = _main_score(models)
    ranked = sorted((m for m in models if main in models[m]["scores"]), key=lambda m: models[m]["scores"][main]["mean"])
    ranking = []
    for better, worse in zip(ranked, ranked[1:] + [None]):
        row: dict[str, Any] = {"model": better, "mean": models[better]["scores"][main]["mean"]}
        if worse is not None:
            a, b = models[better]["scores"][main], models[worse]["scores"][main]
            row["gap_to_next"] = b["mean"] - a["mean"]
            row["beyond_seed_spread"] = (None if a["runs"] < 2 or b["runs"] < 2
                                         else row["gap_to_next"] > max(a["spread"], b["spread"]))
        ranking.append(row)
    return {"main_score": main, "models": models, "ranking": ranking,
            "fewer_parameters_than_default": _fewer_parameters(models),
            "cold_starts_paired": _paired_cold_starts(results.get("models", {}))}


def _fewer_parameters(models: dict[str, Any], reference: str = "horizon") -> list[str]:
    """Models other than the reference and its ablations (``horizon_*``) with fewer parameters
    than the reference in any of their runs, where both recorded them."""
    ours = models.get(reference, {}).get("parameters")
    if not ours:
        return []
    return sorted(name for name, model in models.items() if not name.startswith(reference)
                  and model["parameters"] and min(model["parameters"]) < min(ours))


def paired_bins(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Per position bin of two cold-start scores of the same starts (``by_start``, see
    ``bench.quality._score_cold_starts``): the mean over starts of a's bits per byte minus b's and
    its standard error. What a start's own text costs both models cancels, so a gap of a few
    hundredths in the first bins can be told from noise, which two unpaired means cannot."""
    rows_a, rows_b = a.get("by_start"), b.get("by_start")
    bins = [(p["from"], p["to"]) for p in a.get("by_position", [])]
    if rows_a is None or rows_b is None:
        raise ValueError("paired_bins needs cold-start scores with by_start (results files older than 4a2573e lack it)")
    if bins != [(p["from"], p["to"]) for p in b.get("by_position", [])] or len(rows_a) != len(rows_b):
        raise ValueError("paired_bins needs the same starts and bins in both scores")
    n = len(rows_a)
    out = []
    for i, (low, high) in enumerate(bins):
        diffs = [ra[i] - rb[i] for ra, rb in zip(rows_a, rows_b)]
        stderr = statistics.stdev(diffs) / n ** 0.5 if n > 1 else None
        out.append({"from": low, "to": high, "difference": statistics.fmean(diffs), "stderr": stderr})
    return out


def _paired_cold_starts(entries: dict[str, Any], reference: str = "horizon") -> dict[str, Any]:
    """Every entry's cold-start curve paired with the reference model's (:func:`paired_bins`),
    where both recorded their starts."""
    cold = {name: next((v for k, v in e.get("scores", {}).items() if k.endswith("_test_cold_starts")), None)
            for name, e in entries.items()}
    base = cold.get(reference)
    if not base or "by_start" not in base:
        return {}
    return {f"{name} - {reference}": paired_bins(score, base) for name, score in cold.items()
            if name != reference and score and "by_start" in score
            and len(score["by_start"]) == len(base["by_start"])}


def _main_score(models: dict[str, Any]) -> str | None:
    """The ``*_test_carried`` score most models have (the corpus's own test split)."""
    counts: dict[str, int] = {}
    for model in models.values():
        for key in model["scores"]:
            if key.endswith("_test_carried"):
                counts[key] = counts.get(key, 0) + 1
    return max(counts, key=counts.get) if counts else None


def format_quality_table(summary: dict[str, Any]) -> str:
    """A Markdown table of the ranking: model, seeds, the main score's mean and spread, the gap to
    the next model and whether it exceeds the seed spread."""
    main = summary["main_score"]
    if main is None:
        return "(no *_test_carried score to rank the models by)"
    lines = [f"| model | seeds | {main} (mean) | spread | gap to next | beyond the seed spread |",
             "|---|---|---|---|---|---|"]
    for row in summary["ranking"]:
        model = summary["models"][row["model"]]
        score = model["scores"][main]
        gap = f"{row['gap_to_next']:.3f}" if "gap_to_next" in row else "-"
        beyond = {None: "one seed: unknown", True: "yes", False: "no"}[row.get("beyond_seed_spread")] \
            if "gap_to_next" in row else "-"
        spread = f"{score['spread']:.3f}" if score["runs"] > 1 else "-"
        lines.append(f"| {row['model']} | {len(model['seeds'])} | {score['mean']:.3f} | {spread} | {gap} | {beyond} |")
    if summary.get("fewer_parameters_than_default"):
        lines.append("\nFewer parameters than the default, so not an equal comparison: "
                     + ", ".join(summary["fewer_parameters_than_default"]))
    return "\n".join(lines)
