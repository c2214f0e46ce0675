"""``horizon bench recall`` on CPU in seconds: the generators' invariants, the hit-rate probe,
both rungs end to end on a tiny model, the clear errors, and adding to a results file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from horizonlm import HorizonConfig, HorizonLM
from horizonlm.bench.recall import RecallConfig, beats, run_recall
from horizonlm.bench.recall_data import (
    Filler,
    batch_generator,
    gap_batch,
    load_prose,
    mqar_batch,
    pair_vocab,
)
from horizonlm.bench.recall_probe import MemoryProbe
from horizonlm.checkpoint import save_checkpoint
from horizonlm.cli import main
from horizonlm.errors import HorizonError
from horizonlm.ops.memory_read import memory_read, memory_topk_ids

TINY = ["--preset", "tiny", "--layers", "2", "--vocab-size", "64", "--device", "cpu", "--minutes", "0",
        "--batch-size", "4", "--warmup", "1", "--valid-sequences", "4", "--eval-sequences", "8",
        "--cross-eval-sequences", "4", "--eval-batch", "4", "--log-every", "1"]


def _check_pairs_and_queries(batch, vocab, pairs: int) -> None:
    """Keys and values in their disjoint ranges, distinct per row; every query after its pair,
    asking a key of the row, answered by the value bound to it; each key asked once."""
    tokens = batch.tokens
    keys, values = tokens[:, 0 : 2 * pairs : 2], tokens[:, 1 : 2 * pairs : 2]
    assert ((keys >= vocab.key_lo) & (keys < vocab.key_hi)).all()
    assert ((values >= vocab.value_lo) & (values < vocab.value_hi)).all()
    assert vocab.key_hi <= vocab.value_lo
    for row in range(tokens.shape[0]):
        assert len(set(keys[row].tolist())) == pairs and len(set(values[row].tolist())) == pairs
    asked = tokens.gather(1, batch.query_pos)
    assert (batch.query_pos >= 2 * pairs).all() and (batch.query_pos > batch.answer_pos).all()
    assert torch.equal(tokens.gather(1, batch.answer_pos - 1), asked)  # the key right before the answer
    assert torch.equal(tokens.gather(1, batch.answer_pos), batch.answers)
    assert torch.equal(asked.sort(dim=1).values, keys.sort(dim=1).values)
    targets = batch.targets()
    assert ((targets != -100).sum(dim=1) == pairs).all()
    assert torch.equal(targets.gather(1, batch.query_pos), batch.answers)
    for row in range(tokens.shape[0]):  # nowhere else does a key of the row appear
        elsewhere = torch.ones(tokens.shape[1], dtype=torch.bool)
        elsewhere[: 2 * pairs] = False
        elsewhere[batch.query_pos[row]] = False
        assert not torch.isin(tokens[row][elsewhere], keys[row]).any()


@pytest.mark.parametrize("vocab_size", [64, 8192])
def test_mqar_generator_invariants(vocab_size: int) -> None:
    vocab = pair_vocab(vocab_size, "random")
    filler = Filler(vocab_size, vocab)
    batch = mqar_batch(8, 128, 16, filler, 0.01, batch_generator(0, "train", 1, 0), "cpu")
    assert batch.tokens.shape == (8, 128)
    _check_pairs_and_queries(batch, vocab, 16)
    assert ((batch.query_pos - 32) % 2 == 0).all()  # Zoology's even query slots
    again = mqar_batch(8, 128, 16, filler, 0.01, batch_generator(0, "train", 1, 0), "cpu")
    held_out = mqar_batch(8, 128, 16, filler, 0.01, batch_generator(0, "test", 1, 0), "cpu")
    assert torch.equal(batch.tokens, again.tokens) and not torch.equal(batch.tokens, held_out.tokens)


def test_query_slots_follow_the_power_law() -> None:
    filler = Filler(8192, pair_vocab(8192, "random"))
    early = mqar_batch(64, 1024, 16, filler, 0.01, batch_generator(0, "train", 0), "cpu").query_pos.float().mean()
    uniform = mqar_batch(64, 1024, 16, filler, 1.0, batch_generator(0, "train", 0), "cpu").query_pos.float().mean()
    assert early < uniform - 100


def test_gap_generator_invariants_random_and_prose() -> None:
    vocab = pair_vocab(64, "random")
    batch = gap_batch(4, 8, 100, Filler(64, vocab), batch_generator(0, "test", 2, 0), "cpu")
    assert batch.tokens.shape == (4, 4 * 8 + 100)
    _check_pairs_and_queries(batch, vocab, 8)
    assert torch.equal(batch.query_pos[0], 16 + 100 + 2 * torch.arange(8))
    text = load_prose("test")
    prose = pair_vocab(256, "prose")
    batch = gap_batch(2, 8, 300, Filler(256, prose, text), batch_generator(0, "test", 2, 0), "cpu")
    _check_pairs_and_queries(batch, prose, 8)
    gap = batch.tokens[:, 16:316]
    assert (gap < 128).all()  # prose is ASCII: bytes >= 128 are the pairs'
    assert bytes(gap[0].tolist()) in bytes(text.tolist()) * 2  # a slice of the text, wrapping around


def test_memory_topk_ids_is_the_reads_selection() -> None:
    """The ids the diagnostic reports are the entries the read weighs: reading only those
    entries gives the same read."""
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(7)
    keys = F.normalize(torch.randn(2, 7, 5, generator=g, dtype=torch.float64), dim=-1)
    values = torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    queries = F.normalize(torch.randn(2, 9, 5, generator=g, dtype=torch.float64), dim=-1)
    seen = torch.tensor([0, 1, 2, 3, 5, 7, 7, 7, 7])
    picked = memory_topk_ids(queries, keys, ids, seen, capacity=4, top_k=3, block=4)
    assert picked.shape == (2, 9, 3)
    assert (picked[:, 0] == -1).all() and (picked[:, 1, 1:] == -1).all() and (picked[:, 1, 0] == 0).all()
    for b in range(2):
        for t in range(9):
            chosen = [int(i) for i in picked[b, t] if i >= 0]
            assert all(int(seen[t]) - 4 <= i < int(seen[t]) for i in chosen)
            mask = torch.zeros(7, dtype=torch.bool)
            mask[chosen] = True
            only = memory_read(queries[b : b + 1, t : t + 1], keys[b : b + 1, mask], values[b : b + 1, mask],
                               ids[mask], seen[t : t + 1], 4, 3, 2.0)
            full = memory_read(queries[b : b + 1, t : t + 1], keys[b : b + 1], values[b : b + 1], ids, seen[t : t + 1],
                               4, 3, 2.0)
            torch.testing.assert_close(only, full)


@pytest.mark.parametrize("kind", ["chunk", "induction"])
def test_probe_sees_the_same_reads_in_windows_as_in_one_call(kind: str) -> None:
    """Chunk ids (and, one entry per token, entry positions) of the reads do not depend on how
    the stream is cut; an entry's position lies in the chunk reported for it."""
    torch.manual_seed(0)
    model = HorizonLM(HorizonConfig.preset("tiny", vocab_size=64, memory_capacity=64, memory_kind=kind)).double()
    batch = gap_batch(2, 4, 40, Filler(64, pair_vocab(64, "random")), batch_generator(0, "test", 2, 1), "cpu")
    selected, positions = [], []
    for window in (batch.tokens.shape[1], 8, 13):
        with MemoryProbe(model.memory, batch.query_pos) as probe, torch.no_grad():
            state = None
            for start in range(0, batch.tokens.shape[1], window):
                _, state = model(batch.tokens[:, start : start + window], state)
        selected.append(probe.selected)
        positions.append(probe.selected_pos)
        outcome = probe.outcome(batch.answer_pos)
        assert outcome["applicable"].all() and not outcome["evicted"].any()
        assert not outcome["hit_entry"].any() or kind == "induction"
    assert (selected[0] >= 0).all()
    assert torch.equal(selected[0], selected[1]) and torch.equal(selected[0], selected[2])
    assert torch.equal(positions[0], positions[1]) and torch.equal(positions[0], positions[2])
    if kind == "induction":
        assert (positions[0] >= 0).all()
        assert torch.equal(positions[0] // model.config.chunk_size, selected[0])
    else:
        assert (positions[0] == -1).all()


def test_both_rungs_end_to_end_then_add_to_the_results(tmp_path: Path) -> None:
    out = tmp_path / "recall.json"
    first = ["bench", "recall", *TINY, "--rungs", "1,2", "--models", "horizon,transformer", "--widths", "16",
             "--cells", "32:4", "--test-cells", "32:4,64:8", "--cross-width", "16", "--cross-pairs", "4",
             "--window", "24", "--train-gaps", "0,20", "--gaps", "0,40", "--lrs", "0.003,0.01", "--sweep-steps", "1",
             "--steps", "2", "--out", str(out)]
    assert main(first) == 0
    entries = json.loads(out.read_text())["entries"]
    assert set(entries) == {"rung1 horizon d16 l2 v64 random", "rung1 transformer d16 l2 v64 random",
                            "rung2 horizon d16 l2 v64 random w24", "rung2 transformer d16 l2 v64 random w24"}
    horizon = entries["rung1 horizon d16 l2 v64 random"]
    assert [s["lr"] for s in horizon["sweep"]] == [0.003, 0.01] and horizon["lr_selection"] == "own sweep"
    assert horizon["steps"] == 2 and horizon["environment"]["torch"] == torch.__version__
    assert [(c["seq_len"], c["pairs"], c["queries"]) for c in horizon["cells"]] == [(32, 4, 32), (64, 8, 64)]
    assert all(0 <= c["accuracy"] <= 1 and 0 <= c["hit_rate"] <= 1 for c in horizon["cells"])
    assert all(0 <= c["entry_hit_rate"] <= 1 for c in horizon["cells"])  # the induction memory: one entry per token
    assert entries["rung1 transformer d16 l2 v64 random"]["cells"][0]["hit_rate"] is None
    cross = entries["rung2 horizon d16 l2 v64 random w24"]["cells"]
    assert [(c["gap"], c["status"]) for c in cross] == [(0, "ok"), (40, "ok")]
    assert cross[1]["hit_applicable_fraction"] == 1.0 and cross[1]["hit_chance"] is not None
    transformer = entries["rung2 transformer d16 l2 v64 random w24"]["cells"]
    assert [c["status"] for c in transformer] == ["ok", "not run"]
    assert out.with_suffix(".png").stat().st_size > 0

    again = ["bench", "recall", *TINY, "--rungs", "1", "--models", "horizon_no_memory", "--widths", "16",
             "--cells", "32:4", "--lrs", "0.003", "--steps", "1", "--out", str(out)]
    assert main(again) == 0
    added = json.loads(out.read_text())["entries"]
    assert {k: v for k, v in added.items() if k in entries} == entries
    assert added["rung1 horizon_no_memory d16 l2 v64 random"]["lr_selection"] == "given"
    before = out.read_bytes()
    assert main(again) == 2  # the same entry again: refused, file untouched
    assert out.read_bytes() == before
    assert main([*again, "--replace"]) == 0
    assert set(json.loads(out.read_text())["entries"]) == set(added)


def test_a_run_cut_short_keeps_the_cells_it_scored(tmp_path: Path, monkeypatch) -> None:
    """The entry is written after every scored gap: an evaluation that dies at the second gap
    leaves the first gap's cell in the file, marked incomplete; a finished run says complete."""
    import horizonlm.bench.recall as recall

    out = tmp_path / "recall.json"
    args = ["bench", "recall", *TINY, "--rungs", "2", "--models", "horizon", "--cross-width", "16",
            "--cross-pairs", "4", "--window", "24", "--train-gaps", "0", "--gaps", "0,40,80", "--lrs", "0.003",
            "--steps", "1", "--out", str(out)]
    scored = []

    def dies_at_the_second(*a, **k):
        if len(scored) == 1:
            raise KeyboardInterrupt
        scored.append(1)
        return real(*a, **k)

    real = recall.evaluate
    monkeypatch.setattr(recall, "evaluate", dies_at_the_second)
    assert main(args) == 130  # interrupted
    (entry,) = json.loads(out.read_text())["entries"].values()
    assert entry["complete"] is False and [c["gap"] for c in entry["cells"]] == [0]
    monkeypatch.setattr(recall, "evaluate", real)
    assert main([*args, "--replace"]) == 0
    (entry,) = json.loads(out.read_text())["entries"].values()
    assert entry["complete"] is True and [c["gap"] for c in entry["cells"]] == [0, 40, 80]


def test_eval_topk_narrows_only_the_scoring_read(tmp_path: Path, monkeypatch) -> None:
    """--eval-topk 1: training reads the model's 4 entries, scoring reads 1, and the entry says
    both; more than the memory holds is refused before any training."""
    import horizonlm.bench.recall as recall

    out = tmp_path / "recall.json"
    args = ["bench", "recall", *TINY, "--rungs", "2", "--models", "horizon", "--cross-width", "16",
            "--cross-pairs", "4", "--window", "24", "--train-gaps", "0", "--gaps", "40", "--lrs", "0.003",
            "--steps", "1", "--out", str(out)]
    reads = []
    real = recall.evaluate

    def recording(model, *a, **k):
        reads.append(model.memory.top_k)
        return real(model, *a, **k)

    monkeypatch.setattr(recall, "evaluate", recording)
    assert main([*args, "--eval-topk", "1"]) == 0
    assert reads == [1]
    (entry,) = json.loads(out.read_text())["entries"].values()
    assert entry["config"]["eval_topk"] == 1 and entry["model_config"]["memory_topk"] == 4
    assert main([*args, "--eval-topk", "7", "--label", "too-many"]) == 2  # tiny preset holds 6 chunks


def test_prose_rung_is_byte_level_and_refuses_other_checkpoints(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "bytes", 1, HorizonLM(HorizonConfig.preset("tiny")), {"tokenizer": {"kind": "byte"}})
    save_checkpoint(tmp_path / "words", 1, HorizonLM(HorizonConfig.preset("tiny")),
                    {"tokenizer": {"kind": "word", "words": ["a"]}})
    common = dict(rungs="2", filler="prose", vocab_size=256, cross_pairs=4, window=32, train_gaps="0",
                  gaps="100", lrs="0.003", steps=1, minutes=0, batch_size=2, valid_sequences=2,
                  cross_eval_sequences=2, eval_batch=2, device="cpu", out=str(tmp_path / "r.json"))
    with pytest.raises(HorizonError, match="byte-level"):
        run_recall(RecallConfig(init_checkpoint=str(tmp_path / "words"), **common))
    results = run_recall(RecallConfig(init_checkpoint=str(tmp_path / "bytes"), **common))
    entry = results["entries"]["rung2 horizon+init d32 l2 v256 prose w32"]
    assert entry["chance_accuracy"] == 1 / 64 and entry["cells"][0]["status"] == "ok"


@pytest.mark.parametrize("settings,message", [
    (dict(vocab_size=64, cells="512:40"), "do not fit a vocabulary of 64"),
    (dict(rungs="2", vocab_size=64, cross_pairs=32), "do not fit a vocabulary of 64"),
    (dict(gaps="1024,-5"), "gap must be >= 0"),
    (dict(train_gaps="-1"), "gap must be >= 0"),
    (dict(cells="32:16"), "too short for 16 pairs"),
    (dict(filler="prose"), "vocab_size must be 256"),
    (dict(rungs="2", cross_pairs=16, window=16), "cannot hold the 16 pairs"),
    (dict(rungs="2", train_gaps="4096", window=2048), "no training gap fits the transformer"),
    (dict(models="horizon,gpt"), "unknown model 'gpt'"),
    (dict(steps=0, minutes=0), "give a budget"),
    (dict(rungs="3"), "rungs must name"),
])
def test_bad_settings_are_clear_errors(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RecallConfig(**settings)


def test_generators_reject_bad_shapes_directly() -> None:
    filler = Filler(64, pair_vocab(64, "random"))
    gen = batch_generator(0, "train", 0)
    with pytest.raises(ValueError, match="do not fit"):
        mqar_batch(1, 1024, 32, filler, 0.01, gen, "cpu")
    with pytest.raises(ValueError, match="too short"):
        mqar_batch(1, 15, 4, filler, 0.01, gen, "cpu")
    with pytest.raises(ValueError, match="gap must be >= 0"):
        gap_batch(1, 4, -1, filler, gen, "cpu")


def test_cli_reports_a_corrupt_results_file(tmp_path: Path, capsys) -> None:
    out = tmp_path / "recall.json"
    out.write_text("{not json")
    assert main(["bench", "recall", *TINY, "--rungs", "1", "--models", "horizon", "--widths", "16",
                 "--cells", "32:4", "--lrs", "0.003", "--steps", "1", "--out", str(out)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert out.read_text() == "{not json"


@pytest.mark.parametrize("kind", ["chunk", "induction"])
def test_probe_chance_is_that_of_a_random_read(kind: str) -> None:
    """A read of K entries drawn at random hits the answer's chunk (E entries of N visible) with
    probability 1 - C(N-E, K) / C(N, K), counted here by math.comb (1 when N <= K)."""
    model = HorizonLM(HorizonConfig.preset("tiny", vocab_size=64, memory_capacity=5, memory_kind=kind))
    mem = model.memory
    query_pos = torch.tensor([[0, 8, 17, 30, 47, 200]])  # (1, P): 0, 1, 2, 3, 5 and (capped) 5 chunks seen
    with MemoryProbe(mem, query_pos) as probe:
        chance = probe.outcome(torch.zeros_like(query_pos))["chance"][0].tolist()
    per_chunk = mem.chunk_size if kind == "induction" else 1
    want = []
    for pos in query_pos[0].tolist():
        n = min(pos // mem.chunk_size, mem.capacity) * per_chunk
        if n <= mem.top_k:  # every visible entry is read
            want.append(float(n > 0))
        else:
            want.append(1 - math.comb(n - per_chunk, mem.top_k) / math.comb(n, mem.top_k))
    assert chance == pytest.approx(want)


def _candidate(accuracy: float, loss: float, queries: int = 1024) -> dict:
    return {"valid_accuracy": accuracy, "valid_loss": loss, "valid_queries": queries}


def test_sweep_selection_lets_loss_decide_within_accuracy_noise() -> None:
    # Both at chance (4 vs 3 right of 1024): the lower loss wins, either way round.
    at_chance_low_loss, at_chance_high_loss = _candidate(3 / 1024, 5.56), _candidate(4 / 1024, 5.58)
    assert beats(at_chance_low_loss, at_chance_high_loss) and not beats(at_chance_high_loss, at_chance_low_loss)
    # A real accuracy gap decides against a lower loss.
    learned, lucky = _candidate(0.60, 3.0), _candidate(0.05, 2.0)
    assert beats(learned, lucky) and not beats(lucky, learned)
    # Both perfect: no noise at all, so the loss decides.
    assert beats(_candidate(1.0, 0.01), _candidate(1.0, 0.02))
