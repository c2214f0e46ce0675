"""CPU probe: can the model learn to copy a passkey when every training window holds one?

Each row of a batch is one fresh window of Shakespeare with " The pass key is 48213. Remember
it. 48213 is the pass key. " at a random place and " What is the pass key? The pass key is
48213." at its end; the answer's targets weigh ``--weight``. Every ``--every`` steps it scores
128 held-out windows teacher-forced: exact (all five digits argmax-right) and per-digit
accuracy. Writes a JSON curve; used to tell "cannot" from "not yet" for the passkey recipe.

    python bench/scripts/copy_probe.py --steps 9000 --out bench/results/passkey_cpu_probe.json
    python bench/scripts/copy_probe.py --plot A.json B.json --out curves.png

``--save DIR`` keeps the trained model as a checkpoint, so ``horizon passkey --checkpoint DIR``
can ask it for keys in longer prompts than it was trained on; ``--init DIR`` continues from one
(e.g. with longer windows). An existing ``--out`` is kept unless ``--replace`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from horizonlm import HorizonConfig, HorizonLM
from horizonlm.checkpoint import load_checkpoint, save_checkpoint
from horizonlm.data.needles import needle, question
from horizonlm.data.sources import shakespeare
from horizonlm.errors import HorizonError
from horizonlm.fileio import atomic_write_json


def episode(text: np.ndarray, rng: np.random.Generator, length: int) -> np.ndarray:
    """``length`` tokens of text with the fact somewhere and the question plus answer at the end."""
    key = int(rng.integers(10000, 100000))
    fact = needle(key, None).encode()
    ask = f"{question(None)} {key}.".encode()
    start = int(rng.integers(0, len(text) - length))
    row = text[start : start + length].copy()  # (L,)
    at = int(rng.integers(0, length - len(ask) - len(fact)))
    row[at : at + len(fact)] = np.frombuffer(fact, np.uint8)
    row[length - len(ask) :] = np.frombuffer(ask, np.uint8)
    return row


def batch(text: np.ndarray, rng: np.random.Generator, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.stack([episode(text, rng, length + 1) for _ in range(rows)])).long()  # (B, L+1)
    return x[:, :-1], x[:, 1:]


def plot(paths: list[str], out: str) -> None:
    """Digit and exact-match accuracy against steps, one line pair per probe file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from horizonlm.bench.common import save_figure

    fig, ax = plt.subplots(figsize=(7, 4))
    for path in paths:
        result = json.loads(open(path).read())
        steps = [r["step"] for r in result["curve"]]
        label = Path(path).stem  # the file names what was run; its overrides are in the JSON
        ax.plot(steps, [r["digit"] for r in result["curve"]], label=f"digits right {label}")
        ax.plot(steps, [r["exact"] for r in result["curve"]], "--", label=f"exact {label}")
    ax.axhline(0.1, color="grey", lw=0.8)
    ax.set(xlabel="training step (16 windows, 16 answered keys)", ylabel="held-out accuracy (teacher-forced)",
           title="copying a passkey inside a 192-token window (cpu preset)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, Path(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=192, help="tokens per window")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight", type=float, default=20.0, help="loss weight of the answer's targets")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--overrides", default='{"chunk_size": 32}', help="model settings as JSON")
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="results JSON (with --plot: the PNG)")
    p.add_argument("--plot", nargs="+", help="plot these probe results instead of training")
    p.add_argument("--save", help="checkpoint folder for the trained model (must not exist yet)")
    p.add_argument("--init", help="start from this checkpoint (a curriculum: short windows first) instead of "
                                  "--preset/--overrides")
    p.add_argument("--replace", action="store_true", help="overwrite an existing --out")
    args = p.parse_args()
    if Path(args.out).exists() and not args.replace:
        p.error(f"{args.out} exists; pass --replace to overwrite it, or choose another --out")
    if args.plot:
        plot(args.plot, args.out)
        return
    if args.save and Path(args.save).exists():
        p.error(f"{args.save} exists; choose another --save folder")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    text = np.frombuffer(shakespeare().splits["train"], dtype=np.uint8)
    try:
        model = (load_checkpoint(args.init).model if args.init
                 else HorizonLM(HorizonConfig.preset(args.preset, **json.loads(args.overrides))))
    except (HorizonError, ValueError) as err:  # no checkpoint, bad JSON or settings: say so, train nothing
        p.error(str(err))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed)
    held_x, held_y = batch(text, np.random.default_rng(10_000 + args.seed), 128, args.length)
    weight = torch.ones(args.length)  # (L,)
    weight[-7:] = args.weight  # the targets " 48213."
    curve, t0 = [], time.perf_counter()
    result = {"args": vars(args), "parameters": sum(p.numel() for p in model.parameters()),
              "torch": torch.__version__, "host": platform.processor() or platform.machine(), "curve": curve}
    for step in range(args.steps + 1):
        if step % args.every == 0:
            with torch.no_grad():
                logits, _ = model(held_x)  # (128, L, V)
            pred = logits[:, -6:-1].argmax(-1)  # (128, 5): the five digits
            digits = held_y[:, -6:-1]  # (128, 5)
            curve.append({"step": step, "seconds": time.perf_counter() - t0,
                          "exact": (pred == digits).all(-1).float().mean().item(),
                          "digit": (pred == digits).float().mean().item(),
                          "text_bits_per_byte": F.cross_entropy(logits[:, :-60].reshape(-1, logits.shape[-1]),
                                                                held_y[:, :-60].reshape(-1)).item() / math.log(2)})
            print(json.dumps(curve[-1]), flush=True)
            atomic_write_json(args.out, result)
        if step == args.steps:
            if args.save:
                save_checkpoint(args.save, step, model, {"tokenizer": {"kind": "byte"}})
            break
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 50)
        x, y = batch(text, rng, args.batch, args.length)
        logits, _ = model(x)  # (B, L, V)
        per = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")  # (B*L,)
        loss = (per.view(args.batch, -1) * weight).sum() / (weight.sum() * args.batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


if __name__ == "__main__":
    main()
