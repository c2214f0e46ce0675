"""The lm-evaluation-harness bridge: batched log-likelihoods equal one plain forward pass, greedy
generation equals ``horizon generate``, and the local tasks in tasks/ run through lm_eval's own
``simple_evaluate``, with a rolling perplexity equal to ``horizon eval`` on the same text."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from horizonlm.checkpoint import load_checkpoint  # noqa: E402
from horizonlm.cli import main  # noqa: E402
from horizonlm.data.tokenizers import ByteTokenizer  # noqa: E402
from horizonlm.generate import GenerateConfig, generate  # noqa: E402
from horizonlm.integrations.export import export_folder  # noqa: E402
from horizonlm.integrations.lm_eval import HorizonEvalLM  # noqa: E402

from .conftest import HERE, checkpoint_of, tiny_model  # noqa: E402


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def exported(tmp_path: Path, kind: str = "horizon"):
    model = tiny_model(kind)
    run = checkpoint_of(model, tmp_path / "run")
    return model, run, export_folder(run, tmp_path / "export")


def test_loglikelihood_equals_one_forward_pass(tmp_path: Path, kind: str) -> None:
    """Contexts longer than a window, continuations batched (2 at a time) and right-padded."""
    model, _, out = exported(tmp_path, kind)
    lm = HorizonEvalLM(pretrained=str(out), window=8, batch_size=2, device="cpu")
    long = "ROMEO:\nBut soft, what light through yonder"
    pairs = [(long, " window"), (long, " breaks"), ("JULIET:\nAy", " me"), (long, "?"), (long, " east"), ("", "Hello")]
    got = lm.loglikelihood([request("loglikelihood", *p) for p in pairs], disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        ctx = ByteTokenizer().encode(context) or [10]
        cont = ByteTokenizer().encode(continuation)
        with torch.no_grad():
            logits = model(torch.tensor([ctx + cont]))[0][0, len(ctx) - 1 : -1]  # (n, V)
        want = logits.log_softmax(-1).gather(-1, torch.tensor(cont)[:, None]).sum()
        assert logprob == pytest.approx(float(want), rel=1e-5, abs=1e-4)
        assert greedy == bool((logits.argmax(-1) == torch.tensor(cont)).all())


def test_generate_until_equals_horizon_generate(tmp_path: Path) -> None:
    _, run, out = exported(tmp_path)
    lm = HorizonEvalLM(pretrained=str(out), device="cpu")
    prompt = "ROMEO:\nBut soft"
    cfg = GenerateConfig(checkpoint=str(run), prompt=prompt, tokens=16, temperature=0, device="cpu")
    tokens = generate(load_checkpoint(run).model, ByteTokenizer(), cfg, torch.device("cpu"))
    text = ByteTokenizer().decode(tokens)
    stop = next(chr(t) for t in tokens[2:] if t < 128)
    got = lm.generate_until([request("generate_until", prompt, {"until": ["\x00never"], "max_gen_toks": 16}),
                             request("generate_until", prompt, {"until": [stop], "max_gen_toks": 16})],
                            disable_tqdm=True)
    assert got == [text, text.split(stop)[0]]


def test_local_tasks_and_rolling_equals_horizon_eval(tmp_path: Path, monkeypatch, capsys) -> None:
    _, run, out = exported(tmp_path)
    monkeypatch.chdir(HERE)  # the task files name their data relative to this folder
    results = lm_eval.simple_evaluate(
        model="horizonlm", model_args={"pretrained": str(out), "window": 64, "device": "cpu"},
        tasks=["horizon_shakespeare_mc", "horizon_shakespeare_rolling"],
        task_manager=TaskManager(include_path=str(HERE / "tasks"), include_defaults=False),
        bootstrap_iters=0, log_samples=False,
    )["results"]
    assert 0 <= results["horizon_shakespeare_mc"]["acc,none"] <= 1
    docs = [json.loads(line)["text"] for line in (HERE / "data" / "shakespeare_rolling.jsonl").read_text().splitlines()]
    total_nats = 0.0
    for i, doc in enumerate(docs):
        (tmp_path / f"doc{i}.txt").write_text(doc)
        capsys.readouterr()
        assert main(["eval", "--checkpoint", str(run), "--text", str(tmp_path / f"doc{i}.txt"), "--window", "64",
                     "--device", "cpu"]) == 0
        total_nats += json.loads(capsys.readouterr().out)["total_nats"]
    n_bytes = sum(len(doc.encode()) for doc in docs)
    lm_eval_nats = results["horizon_shakespeare_rolling"]["bits_per_byte,none"] * n_bytes * math.log(2)
    assert lm_eval_nats == pytest.approx(total_nats, rel=1e-9)
