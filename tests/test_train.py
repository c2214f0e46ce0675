"""Training: checkpoints, exact resume, NaN stop, config mismatch."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest
import torch

from horizonlm import train as train_module
from horizonlm.checkpoint import load_checkpoint
from horizonlm.cli import main
from horizonlm.data.prepare import prepare
from horizonlm.errors import HorizonError
from horizonlm.layers.ssm import SSM_PARAM_TAG
from horizonlm.train import TrainConfig, lr_factor, make_optimizer, train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data")
    prepare("shakespeare", path)
    return path


def _cfg(data_dir: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data_dir), out=str(out), preset="tiny", batch_size=4, seq_len=24, steps=8, warmup=2,
                eval_every=0, eval_tokens=200, eval_window=64, save_every=4, progress=False, lr=3e-3)
    return TrainConfig(**{**base, **kw})


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize(("model", "overrides"), [("horizon", {}), ("transformer", {}),
                                                  ("horizon", {"count_lengths": [2, 4]})])
def test_resume_matches_uninterrupted_run(data_dir: Path, tmp_path: Path, model: str, overrides: dict) -> None:
    """The count cache's streams (its tables) are saved with the checkpoint and carried on."""
    straight = train(_cfg(data_dir, tmp_path / "a", model=model, model_overrides=overrides))
    train(_cfg(data_dir, tmp_path / "b", model=model, model_overrides=overrides, stop_after=4))
    if overrides:
        saved = load_checkpoint(tmp_path / "b", with_train_state=True).train_tensors
        assert saved["state0.counts.recent_items"].shape[1] > 0
    # A fresh process would see the same: nothing but the checkpoint carries over.
    train(_cfg(data_dir, tmp_path / "b", model=model, model_overrides=overrides, resume=True))
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(a) == len(b) == 8
    assert a[0] > a[-1]  # it learns
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=1e-6)
    wa = load_checkpoint(tmp_path / "a").model.state_dict()
    wb = load_checkpoint(tmp_path / "b").model.state_dict()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
    assert straight["step"] == 8 and straight["valid"]


def test_state_is_carried_between_windows(data_dir: Path, tmp_path: Path) -> None:
    """Checkpointed training state holds the carried model state at the stream position."""
    train(_cfg(data_dir, tmp_path / "run", steps=3, save_every=3))
    ckpt = load_checkpoint(tmp_path / "run", with_train_state=True)
    header = ckpt.info["carried_states"][0]
    assert header["pos"] == 3 * 24 and header["batch_size"] == 4
    assert "state0.memory.keys" in ckpt.train_tensors


def test_save_streams_off_keeps_no_carried_state_and_resumes_cold(data_dir: Path, tmp_path: Path) -> None:
    """save_streams=False: the checkpoint holds weights, optimizer and RNG but no stream state, and
    a resume starts its streams cold (so its losses differ from a run that carried them)."""
    train(_cfg(data_dir, tmp_path / "run", steps=3, save_every=3, save_streams=False))
    ckpt = load_checkpoint(tmp_path / "run", with_train_state=True)
    assert ckpt.info["carried_states"] == [{"kind": None}]
    assert not any(k.startswith("state") for k in ckpt.train_tensors)
    assert any(k.startswith("opt") for k in ckpt.train_tensors) and "rng.cpu" in ckpt.train_tensors
    train(_cfg(data_dir, tmp_path / "run", steps=5, save_streams=False, resume=True))
    train(_cfg(data_dir, tmp_path / "carried", steps=3, save_every=3))
    train(_cfg(data_dir, tmp_path / "carried", steps=5, resume=True))
    cold, carried = _losses(tmp_path / "run"), _losses(tmp_path / "carried")
    assert len(cold) == len(carried) == 5
    torch.testing.assert_close(torch.tensor(cold[:3]), torch.tensor(carried[:3]))
    assert cold[3] != carried[3]


def test_reset_every_starts_each_episode_fresh(data_dir: Path, tmp_path: Path) -> None:
    """reset_every=2: steps 0 and 2 start from an empty state, so after 3 steps the carried
    state has seen one window, not three; the passkey mix trains alongside."""
    train(_cfg(data_dir, tmp_path / "run", steps=3, save_every=3, reset_every=2, seq_len=300, batch_size=2,
               retrieval_every=2, retrieval_rate=1.0, retrieval_same_window=0.5, retrieval_weight=5.0))
    header = load_checkpoint(tmp_path / "run", with_train_state=True).info["carried_states"][0]
    assert header["pos"] == 300
    asked = [r for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines())
             if "answer_digit_accuracy" in r]
    assert [r["step"] for r in asked] == [2]  # questions end each 2-window episode: step index 1
    assert 0 <= asked[0]["answer_digit_accuracy"] <= 1


def test_weighted_loss_is_lm_loss_plus_weights() -> None:
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))  # (B, L, V), (B, L)
    weight = torch.ones(2, 5)  # (B, L)
    loss, objective = train_module.weighted_loss(logits, targets, weight)
    torch.testing.assert_close(loss, train_module.lm_loss(logits, targets))
    torch.testing.assert_close(objective, loss)
    weight[1, 4] = 3.0
    _, heavier = train_module.weighted_loss(logits, targets, weight)
    extra = 2.0 * torch.nn.functional.cross_entropy(logits[1, 4:5], targets[1, 4:5]) / 10
    torch.testing.assert_close(heavier, loss + extra)


def test_answer_digit_accuracy_counts_only_answer_digits() -> None:
    targets = torch.tensor([[ord(c) for c in "ab 12."]])  # (1, 6)
    weight = torch.tensor([[1.0, 1.0, 5.0, 5.0, 5.0, 5.0]])  # (1, 6)
    logits = torch.full((1, 6, 256), -1.0)  # (1, 6, V)
    for i, c in enumerate("xx 19."):
        logits[0, i, ord(c)] = 1.0
    assert float(train_module.answer_digit_accuracy(logits, targets, weight)) == 0.5
    assert train_module.answer_digit_accuracy(logits, targets, torch.ones(1, 6)) is None


def test_passkey_episodes_refuse_word_level_data(tmp_path: Path) -> None:
    """Episodes write raw bytes into the windows, so word-level data is refused, not corrupted."""
    prepare("shakespeare", tmp_path / "words", tokenizer="word")
    with pytest.raises(HorizonError, match="byte-level tokens, got word-level"):
        train(_cfg(tmp_path / "words", tmp_path / "run", retrieval_every=2, retrieval_rate=1.0, seq_len=300))


def test_nan_loss_stops_with_step_and_keeps_checkpoint(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    real = train_module.lm_loss
    calls = {"n": 0}

    def flaky(logits, targets):
        calls["n"] += 1
        loss = real(logits, targets)
        return loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(train_module, "lm_loss", flaky)
    with pytest.raises(HorizonError, match="at step 5.*step-00000004"):
        train(_cfg(data_dir, tmp_path / "run", save_every=2))
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.info["step"] == 4
    assert all(torch.isfinite(p).all() for p in ckpt.model.parameters())


def test_resume_with_other_model_is_refused(data_dir: Path, tmp_path: Path) -> None:
    train(_cfg(data_dir, tmp_path / "run", steps=2, save_every=2))
    with pytest.raises(HorizonError, match="d_model"):
        train(_cfg(data_dir, tmp_path / "run", steps=4, resume=True, model_overrides={"d_model": 48}))
    with pytest.raises(HorizonError, match="transformer"):
        train(_cfg(data_dir, tmp_path / "run", steps=4, resume=True, model="transformer"))


def test_schedule_and_param_groups() -> None:
    assert lr_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    from horizonlm import HorizonConfig, HorizonLM

    model = HorizonLM(HorizonConfig.preset("tiny"))
    opt = make_optimizer(model, TrainConfig(lr=1e-2, ssm_lr=1e-3), 1e-2, fused=False)
    ssm_group = [g for g in opt.param_groups if g["base_lr"] == 1e-3][0]
    tagged = {id(p) for p in model.parameters() if getattr(p, SSM_PARAM_TAG, False)}
    assert ssm_group["weight_decay"] == 0 and tagged and tagged == {id(p) for p in ssm_group["params"]}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_bad_train_config() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        TrainConfig(seq_len=0)
    with pytest.raises(ValueError, match="model"):
        TrainConfig(model="rnn")
    with pytest.raises(ValueError, match="retrieval_keys"):
        TrainConfig(retrieval_keys=9)
    with pytest.raises(ValueError, match="reset_every"):
        TrainConfig(reset_every=-1)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_new_run_never_replaces_an_existing_one(data_dir: Path, tmp_path: Path) -> None:
    """Issue 13.2: without --resume or --overwrite, a folder holding a run is refused untouched."""
    train(_cfg(data_dir, tmp_path / "run", steps=4, save_every=2))
    before = _files(tmp_path / "run")
    with pytest.raises(HorizonError, match="already holds a run.*--resume.*--overwrite"):
        train(_cfg(data_dir, tmp_path / "run", steps=3, lr=1e-3))
    assert _files(tmp_path / "run") == before
    train(_cfg(data_dir, tmp_path / "run", steps=3, save_every=2, overwrite=True))
    assert len(_losses(tmp_path / "run")) == 3
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")) == ["step-00000002",
                                                                                        "step-00000003"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_says_how_to_resume(data_dir: Path, tmp_path: Path, monkeypatch, capsys,
                                                           signum: int) -> None:
    """Issue 13.6: Ctrl-C (or SIGTERM) in step 3 of 8 finishes the step, saves it, says how to
    resume and exits non-zero; resuming then gives the losses of an uninterrupted run."""
    real = train_module.lm_loss
    calls = {"n": 0}

    def signalling(logits, targets):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signum)
        return real(logits, targets)

    def unhandled(*_):
        raise RuntimeError("the signal reached the default handler: training saved nothing")

    monkeypatch.setattr(train_module, "lm_loss", signalling)
    previous = {s: signal.signal(s, unhandled) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = main(["train", "--data", str(data_dir), "--out", str(tmp_path / "run"), "--preset", "tiny",
                     "--batch-size", "4", "--seq-len", "24", "--steps", "8", "--warmup", "2", "--lr", "3e-3",
                     "--eval-every", "0", "--eval-tokens", "200", "--eval-window", "64", "--save-every", "100",
                     "--no-progress"])
        assert signal.getsignal(signal.SIGINT) is unhandled  # the handlers were put back
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert code == 128 + signum
    err = capsys.readouterr().err
    assert f"horizon train: stopped by {signal.Signals(signum).name} after step 3 of 8" in err
    assert "error" not in err  # a stop the user asked for (issue 26 B8)
    assert f"horizon train --out {tmp_path / 'run'} --resume" in err
    assert load_checkpoint(tmp_path / "run").info["step"] == 3
    monkeypatch.setattr(train_module, "lm_loss", real)
    assert main(["train", "--out", str(tmp_path / "run"), "--resume"]) == 0
    train(_cfg(data_dir, tmp_path / "straight", save_every=100))
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "run")), torch.tensor(_losses(tmp_path / "straight")),
                               rtol=1e-5, atol=1e-6)


def test_validation_is_capped_by_default_the_cap_printed_and_barred(data_dir: Path, tmp_path: Path,
                                                                     capsys) -> None:
    """Validation reads at most eval_tokens (capped by default), says so, and shows a bar."""
    assert TrainConfig().eval_tokens > 0
    summary = train(_cfg(data_dir, tmp_path / "run", steps=2, eval_tokens=100, progress=True))
    out, err = capsys.readouterr()
    assert "validation: the first 100 of the 55,768 valid tokens (--eval-tokens; 0 for all)" in out
    assert "valid:" in err  # the validation's progress bar
    assert summary["valid"][-1]["valid_tokens"] == 100


def test_a_run_without_a_checkpoint_gets_one_advice(data_dir: Path, tmp_path: Path, capsys) -> None:
    """Issue 26 B5: a folder holding a run's config and log but no checkpoint cannot be resumed:
    a new run and --resume both say so and point at --overwrite or another --out, never --resume."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": str(data_dir), "out": str(run), "preset": "tiny"}))
    (run / "log.jsonl").write_text("")
    before = _files(run)
    errors = []
    for argv in ([], ["--resume"]):
        assert main(["train", "--data", str(data_dir), "--out", str(run), "--no-progress", *argv]) == 2
        errors.append(capsys.readouterr().err)
    for err in errors:
        assert "holds a run with no checkpoint (log.jsonl, config.json), which cannot be resumed" in err
        assert "--overwrite" in err and "--out" in err and "pass --resume" not in err
    assert _files(run) == before


def _signal_guard():
    """Handlers that fail the test if a signal reaches them (training must have its own)."""
    def unhandled(*_):
        raise RuntimeError("the signal reached the default handler")
    return {s: signal.signal(s, unhandled) for s in (signal.SIGINT, signal.SIGTERM)}


def _train_argv(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data_dir), "--out", str(out), "--preset", "tiny", "--batch-size", "4",
            "--seq-len", "24", "--steps", "4", "--warmup", "2", "--lr", "3e-3", "--eval-every", "0",
            "--eval-tokens", "0", "--eval-window", "64", "--save-every", "100", "--no-progress", *extra]


@pytest.mark.parametrize("signals", [1, 2])
def test_a_stop_during_the_final_validation_keeps_the_run(data_dir: Path, tmp_path: Path, monkeypatch, capsys,
                                                         signals: int) -> None:
    """Issue 26 B1: the final checkpoint is written before the final validation. Ctrl-C during
    it cuts it short after the running window (reported as a stop, with the tokens scored); a
    second Ctrl-C stops at once, and the checkpoint of the last step is there all the same."""
    real = train_module.evaluate_tokens

    def interrupted_validation(*args, **kwargs):
        for _ in range(signals):
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate_tokens", interrupted_validation)
    previous = _signal_guard()
    try:
        code = main(_train_argv(data_dir, tmp_path / "run"))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    out, err = capsys.readouterr()
    assert load_checkpoint(tmp_path / "run").info["step"] == 4
    if signals == 1:
        assert code == 0
        assert "cut short: stopped by SIGINT; 64 of the 55,768 tokens scored" in out
        valid = [r for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines())
                 if "valid_bits_per_byte" in r]
        assert valid == [{**valid[0], "step": 4, "valid_tokens": 64, "valid_complete": False}]
    else:
        assert code == 130 and "horizon train: interrupted" in err


class _FakeClock:
    """The time budget's clock: a training step takes 9 s, a validation window 1 s."""

    def __init__(self, monkeypatch) -> None:
        self.now = 0.0
        monkeypatch.setattr(train_module, "_now", lambda: self.now)
        real_loss, real_eval = train_module.lm_loss, train_module.evaluate_tokens

        def loss(logits, targets):
            self.now += 9
            return real_loss(logits, targets)

        def evaluate(*args, until=None, **kwargs):
            def ticking():
                self.now += 1
                return until()
            return real_eval(*args, until=ticking, **kwargs)

        monkeypatch.setattr(train_module, "lm_loss", loss)
        monkeypatch.setattr(train_module, "evaluate_tokens", evaluate)


def test_the_time_budget_bounds_training_and_validation(data_dir: Path, tmp_path: Path, monkeypatch,
                                                       capsys) -> None:
    """Issue 26 B2: --max-minutes 1, 9 s steps of 96 tokens, a validation of the whole split and
    none timed yet: its estimate at the training pace exceeds half the budget, so training keeps
    30 s for it and stops after step 3 (one more step would cut into them); the validation is cut
    at the budget's end after 33 windows, says so, and is not taken as the best. Bars off: the
    validation prints its start; the slow pace is warned about after the third step."""
    clock = _FakeClock(monkeypatch)
    summary = train(_cfg(data_dir, tmp_path / "run", steps=100, max_minutes=1, eval_tokens=0, save_every=100))
    out, err = capsys.readouterr()
    assert summary["step"] == 3 and clock.now == 60
    assert summary["valid"] == [{**summary["valid"][0], "step": 3, "valid_tokens": 33 * 64, "valid_complete": False}]
    assert "step 3: validating on 55,768 tokens" in out
    assert "cut short: the 1-minute budget ran out; 2,112 of the 55,768 tokens scored" in out
    assert summary["best"] is None and not (tmp_path / "run" / "checkpoints" / "best").exists()
    assert "9.0 s a step on the CPU: the 1-minute budget ends training near step 3 of 100" in err


def test_the_budget_keeps_the_time_the_last_validation_took(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A validation of 128 tokens is estimated at 12 s (the training pace) until the one at step 3
    takes 1 s (2 windows): training then goes on to step 6, where one more step would leave
    less than 1 s, and the final validation is complete inside the minute."""
    clock = _FakeClock(monkeypatch)
    summary = train(_cfg(data_dir, tmp_path / "run", steps=100, max_minutes=1, eval_every=3, eval_tokens=128,
                         save_every=100))
    assert summary["step"] == 6 and clock.now == 56
    assert [(v["step"], v["valid_tokens"], v.get("valid_complete", True)) for v in summary["valid"]] == [
        (3, 128, True), (6, 128, True)]


def test_a_budget_of_training_time_alone_lets_validation_run(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """budget_includes_validation=False (equal-training-time comparisons): the steps alone take
    the minute, as before issue 26, and the final validation runs to its end past it."""
    clock = _FakeClock(monkeypatch)
    summary = train(_cfg(data_dir, tmp_path / "run", steps=100, max_minutes=1, eval_tokens=640, save_every=100,
                         budget_includes_validation=False))
    assert summary["step"] == 7 and clock.now == 7 * 9 + 9
    assert [(v["step"], v["valid_tokens"], v.get("valid_complete", True)) for v in summary["valid"]] == [
        (7, 640, True)]


@pytest.mark.parametrize("model", ["horizon", "transformer"])
def test_kernel_warmup_leaves_training_as_it_was(data_dir: Path, tmp_path: Path, model: str, monkeypatch) -> None:
    """Warm-up passes (state carried between them, then gradients dropped, random streams forked)
    change no loss, weight or optimizer moment of the run that follows; they ran, two losses with
    gradients more than the run without them."""
    real, calls = train_module.lm_loss, {"a": 0, "b": 0}

    def counting(run):
        def loss(logits, targets):
            calls[run] += logits.requires_grad
            return real(logits, targets)
        return loss

    monkeypatch.setattr(train_module, "lm_loss", counting("a"))
    train(_cfg(data_dir, tmp_path / "a", model=model, memory_read_dropout=0.5))
    monkeypatch.setattr(train_module, "lm_loss", counting("b"))
    train(_cfg(data_dir, tmp_path / "b", model=model, memory_read_dropout=0.5, kernel_warmup=2))
    assert calls["b"] == calls["a"] + 2
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
    a = load_checkpoint(tmp_path / "a", with_train_state=True)
    b = load_checkpoint(tmp_path / "b", with_train_state=True)
    for k, v in a.model.state_dict().items():
        assert torch.equal(b.model.state_dict()[k], v), k
    for k, v in a.train_tensors.items():
        assert torch.equal(b.train_tensors[k], v), k


def test_kernel_warmup_is_outside_the_budget(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """The budget's wall clock starts after the warm-up: two passes of 9 s each on the fake clock,
    and the minute still holds the 6 steps and two validations it holds without them
    (test_the_budget_keeps_the_time_the_last_validation_took)."""
    clock = _FakeClock(monkeypatch)
    summary = train(_cfg(data_dir, tmp_path / "run", steps=100, max_minutes=1, eval_every=3, eval_tokens=128,
                         save_every=100, kernel_warmup=2))
    assert summary["step"] == 6 and clock.now == 2 * 9 + 56


def test_the_best_validated_checkpoint_is_kept_beside_the_latest(data_dir: Path, tmp_path: Path, monkeypatch,
                                                                 capsys) -> None:
    """Issue 26 B4: checkpoints/best names the checkpoint of the best complete validation, its
    folder survives pruning, the summary reports both, and a resumed run keeps comparing with it.
    --checkpoint RUN still loads the latest; RUN/checkpoints/best loads the best."""
    scores = iter([3.0, 2.0, 2.5, 2.2, 2.4])

    def fake_eval(*args, until=None, **kwargs):
        return {"bits_per_byte": next(scores), "tokens": 100, "complete": True}

    monkeypatch.setattr(train_module, "evaluate_tokens", fake_eval)
    run = tmp_path / "run"
    argv = _train_argv(data_dir, run, "--eval-every", "2", "--save-every", "2")
    assert main([*argv, "--steps", "6"]) == 0
    out = capsys.readouterr().out
    ckpts = run / "checkpoints"
    assert (ckpts / "best").read_text().strip() == "step-00000004"
    assert json.loads((ckpts / "best.json").read_text())["valid_bits_per_byte"] == 2.0
    assert f"latest checkpoint: {ckpts / 'step-00000006'}" in out
    best = f"best checkpoint: {ckpts / 'step-00000004'} (step 4, valid 2.0000 bits/byte; --checkpoint {ckpts}/best)"
    assert best in out
    assert load_checkpoint(run).info["step"] == 6
    assert load_checkpoint(ckpts / "best").info["step"] == 4
    assert main(["train", "--out", str(run), "--resume", "--steps", "10"]) == 0
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000004", "step-00000008", "step-00000010"]
    assert (ckpts / "best").read_text().strip() == "step-00000004"


def test_training_time_adds_up_over_resumes_and_a_stop_is_not_an_error(data_dir: Path, tmp_path: Path,
                                                                        capsys) -> None:
    """Issue 26 B8: the checkpoint records the training seconds of every invocation so far, and
    the report of a resumed run gives the total (and this invocation's part)."""
    first = train(_cfg(data_dir, tmp_path / "run", stop_after=4))
    saved = load_checkpoint(tmp_path / "run").info["train_seconds"]
    assert saved == pytest.approx(first["train_seconds"]) and saved > 0
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "run"), "--resume"]) == 0
    out = capsys.readouterr().out
    total = load_checkpoint(tmp_path / "run").info["train_seconds"]
    assert total > saved
    assert re.search(r"trained to step 8 in \d+ s of training, \d+ s of it in this invocation", out)


def test_bars_only_on_a_terminal_unless_forced(monkeypatch) -> None:
    from horizonlm.progress import show_bars

    for tty in (False, True):
        monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
        assert show_bars(None) is tty and show_bars(True) and not show_bars(False)
    assert TrainConfig().progress is None


def test_piped_training_draws_no_bars(data_dir: Path, tmp_path: Path, capsys) -> None:
    """Issue 26 B8: by default (stderr not a terminal, as under pytest) no tqdm escape codes; the
    validation says when it starts and what it scored instead."""
    train(_cfg(data_dir, tmp_path / "run", steps=2, progress=None))
    out, err = capsys.readouterr()
    assert "\r" not in err and "\x1b" not in err and "valid:" not in err
    assert "step 2: validating on 200 tokens" in out and "step 2: valid " in out


def test_memory_read_dropout_and_cold_streams(data_dir: Path, tmp_path: Path) -> None:
    """memory_read_dropout=1 leaves every read out of training: the memory's output projection
    gets a zero gradient, so only weight decay moves it (a common factor), while with 0 it trains;
    staggered cold streams
    (reset_stream_every) and the dropout are pure functions of the step, so a resumed run equals
    an uninterrupted one."""
    from horizonlm import HorizonConfig
    from horizonlm.checkpoint import build_model

    def out_weight(run: Path) -> torch.Tensor:
        return load_checkpoint(run / "checkpoints").model.memory.out.weight

    torch.manual_seed(0)
    initial = build_model("horizon", HorizonConfig.preset("tiny").to_dict()).memory.out.weight.detach()
    train(_cfg(data_dir, tmp_path / "dropped", steps=3, memory_read_dropout=1.0))
    train(_cfg(data_dir, tmp_path / "read", steps=3))
    def decayed_only(weight: torch.Tensor) -> bool:
        ratio = weight.detach() / initial  # (D, Dv)
        return bool(torch.allclose(ratio, ratio.mean().expand_as(ratio), rtol=0, atol=1e-5))

    assert decayed_only(out_weight(tmp_path / "dropped"))
    assert not decayed_only(out_weight(tmp_path / "read"))
    settings = dict(steps=8, memory_read_dropout=0.5, reset_stream_every=3)
    straight = train(_cfg(data_dir, tmp_path / "a", **settings))
    train(_cfg(data_dir, tmp_path / "b", stop_after=4, **settings))
    resumed = train(_cfg(data_dir, tmp_path / "b", resume=True, **settings))
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert straight["train_loss"] == resumed["train_loss"]
