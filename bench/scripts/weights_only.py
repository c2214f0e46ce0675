"""Copy a run's latest checkpoint without its optimizer and carried state (what `horizon passkey`
and `horizon generate` need), small enough to bring back from a GPU machine.

    python bench/scripts/weights_only.py runs/pk-horizon runs/ck-horizon
"""

from __future__ import annotations

import argparse
from pathlib import Path

from horizonlm.checkpoint import load_checkpoint, save_checkpoint
from horizonlm.errors import HorizonError

KEPT = ("tokenizer", "train_config", "tokens_seen", "data")
"""Fields of checkpoint.json that describe the model and its training, not the run's state."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="run or checkpoint folder")
    p.add_argument("out", help="new checkpoint folder (must not exist)")
    args = p.parse_args()
    if Path(args.out).exists():
        p.error(f"{args.out} exists; choose another folder")
    try:
        ckpt = load_checkpoint(args.run)
    except HorizonError as err:  # no checkpoint there, or a corrupt one: say so, write nothing
        p.error(str(err))
    save_checkpoint(args.out, ckpt.info["step"], ckpt.model, {k: ckpt.info[k] for k in KEPT if k in ckpt.info})


if __name__ == "__main__":
    main()
