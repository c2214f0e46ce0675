"""``horizon bench quality``: language-modelling quality at equal training time, with ablations.

Every model trains with the same loop, data, tokens per step and wall-clock budget; its
learning rate is the best of a short sweep (each candidate trained for ``sweep_minutes``,
scored on the valid split). Then: bits per byte on the novels test split (each book one
stream, state carried; and again with the state reset every training window), on the raw
WikiText test text, and word-level perplexity on the WikiText-103 test tokens converted from the
byte model's total loss (out of domain: no WikiText training split is used).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from horizonlm.bench.common import environment, save_figure
from horizonlm.checkpoint import load_checkpoint
from horizonlm.devices import resolve_device
from horizonlm.data.stream import load_meta, open_split
from horizonlm.evaluate import evaluate_tokens, wikitext_word_count, word_perplexity
from horizonlm.fileio import atomic_write_json
from horizonlm.train import TrainConfig, train

ABLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "horizon": ("horizon", {}),
    "transformer": ("transformer", {}),
    "horizon_no_ssm": ("horizon", {"use_ssm": False}),
    "horizon_no_conv": ("horizon", {"use_conv": False}),
    "horizon_no_supervisor": ("horizon", {"use_supervisor": False}),
    "horizon_no_memory": ("horizon", {"use_memory": False}),
}


@dataclass
class QualityConfig:
    """Settings of ``horizon bench quality``."""

    data: str = "runs/data/novels"
    """Prepared novels (byte level): train for training, valid for the sweep, test to score."""
    wikitext_raw: str = "../shared/data/wikitext/wikitext.wiki.test.raw"
    """Raw WikiText test text, scored as bytes ('' to skip)."""
    wikitext_tokens: str = "../shared/data/wikitext/wikitext-103.wiki.test.tokens"
    """WikiText-103 test tokens, for word-level perplexity from the byte loss ('' to skip)."""
    models: str = "horizon,transformer,horizon_no_ssm,horizon_no_conv,horizon_no_supervisor,horizon_no_memory"
    """Comma-separated models (see ABLATIONS)."""
    preset: str = "base"
    """Model preset of every model."""
    minutes: float = 5.0
    """Training budget per model (wall clock of the training steps)."""
    lrs: str = "0.0006,0.0012,0.0024"
    """Learning rates of the sweep; one value skips the sweep."""
    sweep_minutes: float = 1.0
    """Training budget per sweep candidate."""
    batch_size: int = 16
    """Streams per step."""
    seq_len: int = 8192
    """Tokens per window (the transformer's training context)."""
    eval_window: int = 8192
    """Window when streaming the test sets (state carried between windows)."""
    max_eval_tokens: int = 0
    """Score at most this many tokens of each test set (0: all)."""
    position_bins: int = 16
    """Log-spaced bins of position within a book for the by-position curve."""
    runs: str = "runs/quality"
    """Folder for each model's run."""
    out: str = "bench/results/quality.json"
    """Results file (PNG beside it)."""
    device: str = "auto"
    """``auto``, ``cpu`` or ``cuda``."""


def _train(cfg: QualityConfig, name: str, lr: float, minutes: float, out: Path) -> dict[str, Any]:
    kind, overrides = ABLATIONS[name]
    steps = 10**9  # the budget ends each run; the schedule spans an estimate of the steps that fit
    tcfg = TrainConfig(data=cfg.data, out=str(out), model=kind, preset=cfg.preset, model_overrides=overrides,
                       batch_size=cfg.batch_size, seq_len=cfg.seq_len, steps=steps, max_minutes=minutes, lr=lr,
                       ssm_lr=min(lr, 1e-3), eval_every=0, eval_tokens=min(1_000_000, cfg.max_eval_tokens or 10**9),
                       eval_window=cfg.eval_window, save_every=0, device=cfg.device, progress=False)
    tcfg.steps = _estimate_steps(tcfg)
    summary = train(tcfg)
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return {"summary": summary, "log": [r for r in log if "loss" in r], "train_config": asdict(tcfg)}


def _estimate_steps(tcfg: TrainConfig) -> int:
    """Time a few steps to size the cosine schedule to the budget (the timing run is discarded)."""
    probe = TrainConfig(**{**asdict(tcfg), "out": tcfg.out + "-probe", "steps": 6, "max_minutes": 0,
                           "eval_tokens": 2, "save_every": 0})
    summary = train(probe)
    per_step = summary["train_seconds"] / max(1, summary["step"])
    return max(10, int(tcfg.max_minutes * 60 / per_step))


def _score_books(model, tokens: np.ndarray, documents: list, window: int, device, reset_every: int | None,
                 bins: np.ndarray) -> dict[str, Any]:
    """Each book as its own stream; totals and bits per byte by (absolute) position in the book."""
    total, count = 0.0, 0
    sums, counts = np.zeros(len(bins) - 1), np.zeros(len(bins) - 1)
    for _, start, end in documents:
        result = evaluate_tokens(model, tokens[start:end], window, device, reset_every=reset_every,
                                 progress=False, keep_per_token=True)
        total += result["total_nats"]
        count += result["tokens"]
        per = result["per_token_nats"]
        which = np.clip(np.searchsorted(bins, np.arange(1, len(per) + 1), side="right") - 1, 0, len(bins) - 2)
        np.add.at(sums, which, per)
        np.add.at(counts, which, 1)
    by_pos = [{"from": int(bins[i]), "to": int(bins[i + 1]), "bits_per_byte": float(sums[i] / counts[i] / math.log(2))}
              for i in range(len(bins) - 1) if counts[i]]
    return {"bits_per_byte": total / count / math.log(2), "tokens": count, "by_position": by_pos}


def evaluate_model(cfg: QualityConfig, checkpoint: Path, device: torch.device, reset_window: int) -> dict[str, Any]:
    model = load_checkpoint(checkpoint).model.to(device)
    meta = load_meta(cfg.data)
    test = open_split(cfg.data, "test")
    limit = cfg.max_eval_tokens or len(test)
    documents = [d for d in meta.get("documents", {}).get("test", [[None, 0, len(test)]]) if d[1] < limit]
    documents = [[name, start, min(end, limit)] for name, start, end in documents] or [[None, 0, min(len(test), limit)]]
    longest = max(end - start for _, start, end in documents)
    bins = np.unique(np.geomspace(1, max(2, longest + 1), cfg.position_bins + 1).astype(np.int64))
    scores: dict[str, Any] = {"novels_test_carried": _score_books(model, test, documents, cfg.eval_window, device,
                                                                  None, bins)}
    if model.__class__.__name__ == "HorizonLM":
        scores["novels_test_reset_each_window"] = _score_books(model, test, documents, reset_window, device,
                                                               reset_window, bins)
    if cfg.wikitext_raw and Path(cfg.wikitext_raw).is_file():
        raw = np.frombuffer(Path(cfg.wikitext_raw).read_bytes(), dtype=np.uint8)[:limit]
        r = evaluate_tokens(model, raw, cfg.eval_window, device, progress=False)
        scores["wikitext_raw_test"] = {"bits_per_byte": r["bits_per_byte"], "tokens": r["tokens"]}
    if cfg.wikitext_tokens and Path(cfg.wikitext_tokens).is_file():
        text = Path(cfg.wikitext_tokens).read_bytes()[:limit]
        r = evaluate_tokens(model, np.frombuffer(text, dtype=np.uint8), cfg.eval_window, device, progress=False)
        words = wikitext_word_count(text.decode("utf-8", errors="replace"))
        scores["wikitext103_test_word_ppl_out_of_domain"] = {
            "word_perplexity": word_perplexity(r["total_nats"], words), "words": words, "bytes": r["tokens"] + 1,
            "note": "byte model trained on novels only; total byte loss over the .tokens text divided by its words + <eos>"}
    return scores


def run_quality(cfg: QualityConfig) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    results: dict[str, Any] = {"environment": environment(), "config": asdict(cfg), "models": {}}
    lrs = [float(x) for x in cfg.lrs.split(",")]
    for name in cfg.models.split(","):
        if name not in ABLATIONS:
            raise ValueError(f"unknown model {name!r}; choose from {', '.join(ABLATIONS)}")
        sweep = []
        if len(lrs) > 1:
            for lr in lrs:
                run = _train(cfg, name, lr, cfg.sweep_minutes, Path(cfg.runs) / f"{name}-lr{lr:g}")
                valid = run["summary"]["valid"][-1]["valid_bits_per_byte"] if run["summary"]["valid"] else float("inf")
                sweep.append({"lr": lr, "valid_bits_per_byte": valid})
        best = min(sweep, key=lambda r: r["valid_bits_per_byte"])["lr"] if sweep else lrs[0]
        run = _train(cfg, name, best, cfg.minutes, Path(cfg.runs) / name)
        summary = run["summary"]
        entry = {"lr": best, "sweep": sweep, "parameters": summary["parameters"], "tokens_seen": summary["tokens_seen"],
                 "train_seconds": summary["train_seconds"], "train_loss": summary["train_loss"], "steps": summary["step"],
                 "first_step_seconds_incl_warmup": run["log"][0]["time"] if run["log"] else None,
                 "loss_curve": [[r["time"], r["loss"]] for r in run["log"]],
                 "scores": evaluate_model(cfg, Path(cfg.runs) / name / "checkpoints", device, cfg.seq_len)}
        results["models"][name] = entry
        print(json.dumps({"model": name, "lr": best, **{k: v.get("bits_per_byte", v.get("word_perplexity"))
                                                       for k, v in entry["scores"].items()}}), flush=True)
        atomic_write_json(out, results)
    plot_quality(results, out.with_suffix(".png"))
    return results


def plot_quality(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, entry in results["models"].items():
        curve = np.array(entry["loss_curve"])
        if len(curve):
            axes[0].plot(curve[:, 0], curve[:, 1] / math.log(2), label=name)
        for key, style in (("novels_test_carried", "-"), ("novels_test_reset_each_window", ":")):
            pos = entry["scores"].get(key, {}).get("by_position", [])
            if pos:
                axes[1].plot([(p["from"] + p["to"]) / 2 for p in pos], [p["bits_per_byte"] for p in pos], style,
                             label=f"{name} ({'carried' if style == '-' else 'reset'})")
    axes[0].set(xlabel="training seconds", ylabel="train bits per byte", title="loss against time")
    axes[1].set(xlabel="position in the book (bytes)", ylabel="bits per byte", title="novels test by position",
                xscale="log")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
