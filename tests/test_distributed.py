"""DDP with two gloo processes equals one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from horizonlm.checkpoint import load_checkpoint
from horizonlm.data.prepare import prepare
from horizonlm.train import TrainConfig, train

ARGS = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "16", "--steps", "4", "--warmup", "1",
        "--eval-every", "0", "--eval-tokens", "64", "--save-every", "4", "--no-progress", "--device", "cpu"]


def test_two_processes_match_one(tmp_path: Path) -> None:
    prepare("shakespeare", tmp_path / "data")
    train(TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "single"), preset="tiny", batch_size=4,
                      seq_len=16, steps=4, warmup=1, eval_every=0, eval_tokens=64, save_every=4, progress=False,
                      device="cpu"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "horizonlm.cli",
           "train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "ddp"), *ARGS]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single = load_checkpoint(tmp_path / "single").model.state_dict()
    ddp = load_checkpoint(tmp_path / "ddp")
    assert ddp.info["world"] == 2
    # The all-reduced loss equals the single-process loss at every step...
    losses = [[json.loads(x)["loss"] for x in (tmp_path / run / "log.jsonl").read_text().splitlines()
               if "loss" in json.loads(x)] for run in ("single", "ddp")]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-6)
    # ...and the weights agree to a small fraction of what 4 AdamW steps of lr 6e-3 move them
    # (Adam divides by sqrt(v), so where a gradient is near zero, the summation order of the
    # all-reduce shows up at the 1e-5 level).
    for name, value in ddp.model.state_dict().items():
        torch.testing.assert_close(value, single[name], rtol=1e-3, atol=1e-4)
