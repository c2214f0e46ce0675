"""The passkey pipeline end to end: prompts, windows, greedy decoding and scoring."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from horizonlm import HorizonConfig, HorizonLM
from horizonlm.checkpoint import save_checkpoint
from horizonlm.cli import main
from horizonlm.data.sources import shakespeare
from horizonlm.layers.memory import reads_dropped
from horizonlm.passkey import (
    PasskeyConfig,
    answer,
    answer_with_hits,
    build_prompt,
    by_cue_overlap,
    causal_summary,
    digit_positions,
    digits_right,
    fact_entry_positions,
    run_passkey,
    score,
    swap_fact_entries,
    swap_key_text,
    swapped_answer,
)

HAYSTACK = b" ".join(shakespeare().splits["test"].split())


class Oracle(nn.Module):
    """Reads the prompt as it streams (state = bytes so far) and, once asked, emits the right
    key's digits (or a fixed wrong answer): a stand-in whose score we know in advance."""

    def __init__(self, wrong: bool = False) -> None:
        super().__init__()
        self.wrong = wrong

    def forward(self, tokens: torch.Tensor, state=None):
        seen = [(old + bytes(row)) for old, row in zip(state or [b""] * tokens.shape[0], tokens.tolist())]
        logits = torch.full((tokens.shape[0], tokens.shape[1], 256), -1e9)  # (B, T, V)
        for row, text in enumerate(seen):
            logits[row, -1, self._next(text.decode("utf-8", errors="replace"))] = 0
        return logits, seen

    def _next(self, text: str) -> int:
        asked = re.search(r"What is the pass key(?: for the (\w+) door)?\? The pass key(?: for the \w+ door)? is(.*)$", text)
        if not asked:
            return ord(" ")
        door, answered = asked.group(1), asked.group(2)
        pattern = rf"pass key for the {door} door is (\d{{5}})" if door else r"pass key is (\d{5})"
        key = "00000" if self.wrong else re.search(pattern, text).group(1)
        reply = " " + key + "."
        return ord(reply[len(answered)]) if len(answered) < len(reply) else ord(".")


@pytest.mark.parametrize("keys", [1, 4])
def test_prompt_has_exact_length_and_one_asked_key(keys: int) -> None:
    rng = random.Random(0)
    for depth in (0, 50, 100):
        asked = build_prompt(HAYSTACK, 3000, depth, keys, rng)
        prompt, key = asked.text, asked.key
        assert len(prompt) == 3000 and prompt[asked.question_at :].startswith(b" What is the pass key")
        assert prompt.count(str(key).encode()) == 2
        assert prompt.count(b"Remember it.") == keys


@pytest.mark.parametrize("batch", [1, 2])
def test_oracle_scores_100_and_wrong_model_0(batch: int) -> None:
    cfg = PasskeyConfig(lengths="1024,4096", depths="0,50,100", trials=3, window=1000, keys=4, batch=batch)
    right = run_passkey(Oracle(), HAYSTACK, cfg, torch.device("cpu"), "oracle")
    wrong = run_passkey(Oracle(wrong=True), HAYSTACK, cfg, torch.device("cpu"), "wrong")
    assert {c["accuracy"] for c in right["cells"]} == {1.0}
    assert {c["accuracy"] for c in wrong["cells"]} == {0.0}
    assert {c["digit_accuracy"] for c in right["cells"]} == {1.0}
    assert all(c["examples"][0][1].startswith(f" {c['examples'][0][0]}.") for c in right["cells"])


def test_trials_side_by_side_answer_as_one_at_a_time() -> None:
    """A real model (tiny preset, memory on): feeding a cell's trials as one batch gives every
    trial the reply it gets alone, so ``batch`` changes the speed, never the score."""
    torch.manual_seed(0)
    model = HorizonLM(HorizonConfig.preset("tiny"))
    alone = run_passkey(model, HAYSTACK, PasskeyConfig(lengths="700", depths="0,100", trials=3, window=256,
                                                       progress=False), torch.device("cpu"), "tiny")
    together = run_passkey(model, HAYSTACK, PasskeyConfig(lengths="700", depths="0,100", trials=3, window=256,
                                                          batch=3, progress=False), torch.device("cpu"), "tiny")
    assert [c["examples"] for c in alone["cells"]] == [c["examples"] for c in together["cells"]]


def test_read_topk_sets_the_memory_read_and_refuses_a_model_without_memory() -> None:
    from horizonlm import TransformerConfig, TransformerLM
    from horizonlm.errors import HorizonError
    from horizonlm.passkey import set_read_topk

    model = HorizonLM(HorizonConfig.preset("tiny"))
    set_read_topk(model, 1)
    assert model.memory.top_k == 1
    with pytest.raises(HorizonError, match="memory_capacity"):
        set_read_topk(model, model.memory.capacity + 1)
    with pytest.raises(HorizonError, match="has none"):
        set_read_topk(TransformerLM(TransformerConfig(d_model=32, n_layers=1, n_heads=2, mlp_hidden=32)), 1)


class Forced(nn.Module):
    """A real HorizonLM whose greedy reply is forced to the right answer (" 48213."): its memory
    does the reading, so the hit record of :func:`answer_with_hits` can be checked exactly."""

    def __init__(self, inner: HorizonLM, prompt_length: int, answers: list[bytes]) -> None:
        super().__init__()
        self.inner, self.memory, self.embed = inner, inner.memory, inner.embed
        self.prompt_length, self.answers = prompt_length, answers

    def forward(self, tokens: torch.Tensor, state=None):
        logits, state = self.inner(tokens, state)
        at = state.pos - self.prompt_length  # index of the reply byte these logits predict
        if at >= 0:
            logits = torch.full_like(logits, -1e9)  # (B, T, V)
            for row, reply in enumerate(self.answers):
                logits[row, -1, reply[min(at, len(reply) - 1)]] = 0
        return logits, state


@pytest.mark.parametrize("keys", [1, 4])
def test_hits_record_whether_the_memory_read_the_facts_digits(keys: int) -> None:
    """The default induction memory (16-byte keys through the shared W_k, before the first
    block), untrained, reading one entry: every digit's query repeats the 16 bytes before that
    digit in the fact, so it reads exactly that digit's entry (hit 1 for all five). Keyed by one
    byte, the first digit's query (a space) meets every entry that followed a space, and its read
    misses: the record can say no."""
    rng = random.Random(1)
    asked = [build_prompt(HAYSTACK, 2000, depth, keys, rng) for depth in (0, 40, 100)]
    prompts, answers = [p.text for p in asked], [f" {p.key}.".encode() for p in asked]
    recipe = dict(chunk_size=8, memory_key_span=16, memory_capacity=512, memory_topk=1)
    one_byte = {**recipe, "memory_key_span": 1}
    for overrides, want in [(recipe, "all"), (one_byte, "not the first")]:
        torch.manual_seed(0)
        model = Forced(HorizonLM(HorizonConfig.preset("tiny", **overrides)), 2000, answers)
        replies, hits, weights = answer_with_hits(model, prompts, [p.key for p in asked], 512, torch.device("cpu"))
        assert [r[:7] for r in replies] == [a.decode() for a in answers]
        assert hits.shape == weights.shape == (3, 5)
        assert (weights[~hits] == 0).all()  # no weight on an entry the read did not hold
        if want == "all":
            # one entry read, an exact match (score 1) against the null entry's s_0: its softmax weight
            tau, s0 = model.memory.tau, model.memory.null_score.item()
            exact = 1 / (1 + math.exp(tau * (s0 - 1)))
            assert hits.all() and torch.allclose(weights, torch.full_like(weights, exact), atol=1e-4), weights
            # with a grown tau (a as if trained) the weight is the one the read used: tau_t = tau (1 + a log n_t),
            # n_t the entries the digit's query saw (the chunks completed before it, 8 entries each)
            with torch.no_grad():
                model.memory.tau_growth.fill_(0.3)
            _, _, grown = answer_with_hits(model, prompts, [p.key for p in asked], 512, torch.device("cpu"))
            seen = torch.tensor([[(len(prompt) + i) // 8 * 8 for i in range(5)] for prompt in prompts])  # (3, 5)
            tau_t = tau * (1 + 0.3 * torch.log(seen.double()))  # (3, 5)
            torch.testing.assert_close(grown.double(), 1 / (1 + torch.exp(tau_t * (s0 - 1))), atol=1e-4, rtol=0)
        else:
            assert not hits[:, 0].any()


def test_scoring() -> None:
    assert score(" 48213. ", 48213) and score("48213", 48213)
    assert not score(" 4821", 48213) and not score(" 48214", 48213)
    assert not score(" 482130", 48213) and not score(" 148213", 48213)  # six digits are not the key
    assert not score(None, 48213) and not score(" the door", 48213)


@pytest.mark.parametrize("keys", [1, 4])
def test_held_out_wording_states_each_key_once_in_a_held_out_phrasing(keys: int) -> None:
    from horizonlm.data.episodes import HELD_OUT_QUESTIONS

    rng = random.Random(3)
    for depth in (0, 50, 100):
        asked = build_prompt(HAYSTACK, 3000, depth, keys, rng, wording="heldout")
        assert len(asked.text) == 3000 and b"pass key" not in asked.text
        question = asked.text[asked.question_at :].decode()
        assert any(re.fullmatch(q.replace("?", r"\?").format(K=".+", L="the \\w+ door"), question)
                   for q in HELD_OUT_QUESTIONS), question
        assert asked.text.count(str(asked.key).encode()) == 1
        assert len(digit_positions(asked.text, asked.key)) == 5


def test_training_wording_asks_in_the_mix_phrasings_and_every_trial_records_its_own() -> None:
    from horizonlm.data.episodes import TRAIN_CORES, TRAIN_QUESTIONS, cue_overlap

    rng = random.Random(6)
    for depth in (0, 50, 100):
        asked = build_prompt(HAYSTACK, 2000, depth, 1, rng, wording="train")
        core, question = asked.form.split(" |")
        assert core in TRAIN_CORES and " " + question.lstrip() in TRAIN_QUESTIONS and b"pass key" not in asked.text
        fact = next(s for s in re.split(r"(?<=[.!?]) (?=[A-Z0-9])", asked.text.decode()) if str(asked.key) in s)
        assert asked.overlap == cue_overlap(" " + fact, asked.text[asked.question_at:].decode(), str(asked.key))
    bench = build_prompt(HAYSTACK, 2000, 50, 1, rng)
    assert (bench.form, bench.overlap) == ("benchmark", len(" The pass key is "))


def test_accuracy_by_cue_overlap_groups_every_trial_that_ran() -> None:
    cells = [{"status": "ok", "examples": [[11111, " 11111."], [22222, " 2"], [33333, " 33333."]],
              "cue_overlap": [1, 2, 17]},
             {"status": "OOM"},
             {"status": "ok", "examples": [[44444, " 44444."]], "cue_overlap": [9]}]
    assert by_cue_overlap(cells) == [{"overlap": "0-3", "trials": 2, "accuracy": 0.5},
                                     {"overlap": "8-11", "trials": 1, "accuracy": 1.0},
                                     {"overlap": "16+", "trials": 1, "accuracy": 1.0}]


def test_causal_check_says_no_for_a_forced_reply() -> None:
    """A reply forced from outside (right whatever the memory holds) does not follow the memory:
    it stays right with the read removed and with the fact's entries holding another key."""
    rng = random.Random(2)
    device = torch.device("cpu")
    keys, replies, without, swaps, swapped = [], [], [], [11111, 22222], []
    for depth, swap in zip((10, 60), swaps):
        asked = build_prompt(HAYSTACK, 1500, depth, 1, rng, wording="heldout")
        torch.manual_seed(0)
        model = Forced(HorizonLM(HorizonConfig.preset("tiny", memory_capacity=512)), 1500, [f" {asked.key}.".encode()])
        keys.append(asked.key)
        replies += answer(model, [asked.text], 512, device)
        with reads_dropped(model.memory):
            without += answer(model, [asked.text], 512, device)
        swapped += swapped_answer(model, [asked], [swap], 512, device)
    summary = causal_summary(keys, replies, without, swaps, swapped)
    assert summary["accuracy_without_read"] == 1.0 and summary["swap_trials"] == 2
    assert summary["follows_swap"] == 0.0 and summary["keeps_original_under_swap"] == 1.0
    assert summary["digits_keeping_original"] == 1.0 and summary["digits_following_swap"] < 1.0


def test_causal_summary_counts_digits_that_follow_the_swap() -> None:
    summary = causal_summary([48213, 11111], [" 48213.", " 11111."], [" no", " 11111."], [90817, 22222],
                             [" 90813.", None])
    assert summary["swap_trials"] == 1 and summary["follows_swap"] == 0.0
    assert summary["digits_following_swap"] == 0.8 and summary["digits_keeping_original"] == 0.4
    assert summary["accuracy_without_read"] == 0.5


@pytest.mark.parametrize("memory_layer", [0, 1])
def test_swap_gives_the_facts_entries_another_keys_statement(memory_layer: int) -> None:
    """The swap rewrites exactly the fact's entries (the five digits' and the key span's after
    them, keys and values) with those the same text writes when it states the other key (before
    the first block a digit's value is a function of the byte alone: ``W_v norm(embed(d))``);
    every other entry is left as it was."""
    rng = random.Random(4)
    asked = build_prompt(HAYSTACK, 900, 50, 1, rng, wording="heldout")
    torch.manual_seed(0)
    model = HorizonLM(HorizonConfig.preset("tiny", memory_capacity=512, memory_layer=memory_layer)).double()
    cpu = torch.device("cpu")
    tokens = torch.tensor([list(asked.text[: asked.question_at])])  # (1, T)
    other = torch.tensor([list(swap_key_text(asked, 90817)[: asked.question_at])])  # (1, T)
    digits = digit_positions(asked.text, asked.key)
    rows = fact_entry_positions(asked, model.config.memory_key_span)
    assert rows == list(range(digits[0], digits[-1] + model.config.memory_key_span + 1))
    with torch.no_grad():
        _, state = model(tokens)
        _, other_state = model(other)
        swapped, usable = swap_fact_entries(model, state, [asked], [90817], 256, cpu)
        if memory_layer == 0:
            embedded = model.memory.norm(model.embed(torch.tensor([list(b"90817")])))  # (1, 5, D)
            torch.testing.assert_close(swapped.memory.values[0, digits], model.memory.value(embedded)[0])
    assert usable == [True]
    assert swap_key_text(asked, 90817).count(b"90817") >= 1 and len(swap_key_text(asked, 90817)) == len(asked.text)
    for field in ("keys", "values"):
        new, old, want = (getattr(s.memory, field)[0] for s in (swapped, state, other_state))
        torch.testing.assert_close(new[rows], want[rows])
        others = [i for i in range(old.shape[0]) if i not in rows]
        assert torch.equal(new[others], old[others])
        assert not torch.allclose(new[rows], old[rows])


def test_cli_runs_a_real_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ckpt", 1, HorizonLM(HorizonConfig.preset("tiny")), {"tokenizer": {"kind": "byte"}})
    hay = tmp_path / "hay.txt"
    hay.write_bytes(HAYSTACK[:20000])
    out = tmp_path / "passkey.json"
    assert main(["passkey", "--checkpoint", str(tmp_path / "ckpt"), "--haystack", str(hay), "--lengths", "512,2048",
                 "--depths", "0,100", "--trials", "2", "--max-length", "1024", "--out", str(out),
                 "--device", "cpu", "--no-progress"]) == 0
    entry = json.loads(out.read_text())["models"]["horizon (1 key)"]
    assert [c["status"] for c in entry["cells"]] == ["ok", "ok", "not run", "not run"]
    # the read's learned scalars as the checkpoint holds them (a fresh model: a = 0, s_0 = 0.5)
    assert entry["environment"]["checkpoint"] == {"path": str(tmp_path / "ckpt" / "step-00000001"), "step": 1,
                                                  "memory_read": {"tau": 10.0, "null_score": 0.5, "tau_growth": 0.0}}
    assert out.with_suffix(".png").is_file()


def test_digit_credit_is_positional() -> None:
    assert digits_right(" 48213.", 48213) == 5
    assert digits_right(" 48299.", 48213) == 3
    assert digits_right(" 13482", 48213) == 0
    assert digits_right("", 48213) == 0


def test_empty_grid_is_refused() -> None:
    with pytest.raises(ValueError, match="lengths and depths"):
        PasskeyConfig(lengths="")
    with pytest.raises(ValueError, match="lengths and depths"):
        PasskeyConfig(depths=" , ")


def test_results_go_to_the_run_folder_and_are_only_added_to(tmp_path: Path, monkeypatch, capsys) -> None:
    """Issue 13.3: by default the results land in the checkpoint's run folder (not the tracked
    bench/results/), another model's run adds its entry, and an earlier entry of the same model
    is replaced only with --overwrite. The end of the run prints the accuracy table."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, HorizonLM(HorizonConfig.preset("tiny")),
                    {"tokenizer": {"kind": "byte"}})
    hay = tmp_path / "hay.txt"
    hay.write_bytes(HAYSTACK[:20000])
    args = ["passkey", "--checkpoint", str(tmp_path / "run"), "--haystack", str(hay), "--lengths", "512,1024",
            "--depths", "0,100", "--trials", "1", "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    out = tmp_path / "run" / "passkey.json"
    assert out.is_file() and not (tmp_path / "bench").exists()
    table = capsys.readouterr().out
    assert re.search(r"^depth\s+512\s+1K$", table, re.M) and re.search(r"^ +0%\s+\d+%\*\s+\d+%\*$", table, re.M)
    assert re.search(r"^ *100%\s+\d+%\*?\s+\d+%\*?$", table, re.M)
    assert "outside the memory's window" in table  # depth 0 of 512 tokens is far beyond 6 chunks of 8
    before = out.read_bytes()
    assert main(args) == 2
    assert "already holds results for 'horizon (1 key)'" in capsys.readouterr().err and out.read_bytes() == before
    assert main([*args, "--label", "again"]) == 0
    models = json.loads(out.read_text())["models"]
    assert set(models) == {"horizon (1 key)", "again (1 key)"}
    assert models["horizon (1 key)"] == json.loads(before)["models"]["horizon (1 key)"]
    assert models["again (1 key)"]["complete"] is True
    assert main([*args, "--overwrite"]) == 0


def test_a_file_that_is_not_results_is_never_replaced(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ckpt", 1, HorizonLM(HorizonConfig.preset("tiny")), {"tokenizer": {"kind": "byte"}})
    notes = tmp_path / "notes.json"
    notes.write_text('["my own notes"]')
    assert main(["passkey", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(notes), "--lengths", "512"]) == 2
    assert "is not a passkey results file" in capsys.readouterr().err and notes.read_text() == '["my own notes"]'


def test_prepare_model_sets_the_asking_memory_and_refuses_what_cannot_run() -> None:
    from horizonlm.errors import HorizonError
    from horizonlm.passkey import prepare_model

    model = HorizonLM(HorizonConfig.preset("tiny"))
    block = model.memory.query_block
    prepare_model(model, PasskeyConfig(memory_capacity=4096, batch=2))
    assert model.memory.capacity == 4096 and model.memory.query_block == block
    with pytest.raises(HorizonError, match="below the read's top-K"):
        prepare_model(model, PasskeyConfig(memory_capacity=2))
    chunk = HorizonLM(HorizonConfig.preset("tiny", memory_kind="chunk", memory_key_span=1))
    with pytest.raises(HorizonError, match="chunk memory"):
        prepare_model(chunk, PasskeyConfig(causal_check=True))


def test_fact_in_memory_follows_the_visibility_rule() -> None:
    """The fact's first digit is readable from the answer's token only if its chunk completed
    before that token's chunk and is one of the last ``capacity``; the cell records the share."""
    from horizonlm.passkey import Prompt, fact_in_memory

    text = b"x" * 100 + b"key 48213 here" + b"y" * 186  # 300 bytes; the digits at 104-108
    prompt = Prompt(text=text, key=48213, question_at=290)
    assert fact_in_memory(prompt, chunk_size=8, capacity=100)  # chunk 13, answer token in chunk 37
    assert not fact_in_memory(prompt, chunk_size=8, capacity=20)  # chunks 17..36 only
    same_chunk = Prompt(text=b"x" * 9 + b"48213" + b"yy", key=48213, question_at=14)  # digits and answer in chunk 1
    assert not fact_in_memory(same_chunk, 8, 100)
