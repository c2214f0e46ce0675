"""The recall episodes of the training mix: varied, and never the benchmark's or the held-out
wording (the split lives in code, in horizonlm.data.episodes)."""

from __future__ import annotations

import random
import re

from horizonlm.data.episodes import (
    HELD_OUT_CORES,
    HELD_OUT_QUESTIONS,
    KINDS,
    TRAIN_CORES,
    TRAIN_QUESTIONS,
    cloze,
    cue_overlap,
    draw_episode,
    held_out_templates,
    longest_fact,
    train_templates,
)
from horizonlm.data.needles import DOORS, needle, question


def _pattern(template: str) -> re.Pattern:
    """A template as a regex over any label, kind and value (case-insensitive first letter)."""
    parts = re.split(r"(\{[LKV]\})", template.strip())
    body = "".join(".+?" if p in ("{L}", "{K}", "{V}") else re.escape(p) for p in parts)
    return re.compile(body, re.IGNORECASE)


def _training_statements(n: int = 3000) -> list[tuple[str, str]]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        facts, asked = draw_episode(rng, rng.randint(1, 4))
        out += [(f.statement, f.question) for f in facts]
    return out


def test_hundreds_of_phrasings_and_every_core_used() -> None:
    assert len(train_templates()) >= 500 and len(held_out_templates()) >= 100
    statements = _training_statements()
    for core in TRAIN_CORES:
        assert any(_pattern(core).search(s) for s, _ in statements), core
    assert len({q for _, q in statements}) > 100


def test_the_split_is_disjoint_and_held_out_phrasings_never_train() -> None:
    assert not set(TRAIN_CORES) & set(HELD_OUT_CORES)
    assert not set(TRAIN_QUESTIONS) & set(HELD_OUT_QUESTIONS)
    held = [_pattern(c) for c in HELD_OUT_CORES]
    asked = [_pattern(q) for q in HELD_OUT_QUESTIONS]
    for statement, q in _training_statements():
        assert not any(p.search(statement) for p in held), statement
        assert not any(p.fullmatch(q.strip()) for p in asked), q


def test_the_benchmark_sentences_cannot_be_generated() -> None:
    """Every benchmark sentence says "pass key"; no training kind, opener, core, closer or
    question does, so no generated text can be one of them (checked on generated text too)."""
    benchmark = [needle(48213, d) for d in (None, *DOORS)] + [question(d) for d in (None, *DOORS)]
    assert all("pass key" in sentence for sentence in benchmark)
    parts = [*KINDS, *TRAIN_CORES, *TRAIN_QUESTIONS, *(p for t in train_templates() for p in (t[0], t[2]))]
    assert not any("pass key" in part.lower() for part in parts)
    assert not any("pass key" in s.lower() or "pass key" in q.lower() for s, q in _training_statements())


def test_labels_sometimes_stand_far_before_the_value() -> None:
    """Some facts put their label more than 16 bytes before the value (a short key span alone
    cannot tell them apart), and some put it after the value."""
    far = after = 0
    rng = random.Random(1)
    for _ in range(2000):
        facts, _ = draw_episode(rng, 1, value_kind="digits")
        s = facts[0].statement
        label, value = s.find(facts[0].label), s.find(facts[0].value)
        far += value - (label + len(facts[0].label)) > 16
        after += label > value
    assert far > 50 and after > 50


def test_episodes_fit_the_bound_and_are_reproducible() -> None:
    for n in (1, 4):
        rng = random.Random(n)
        for _ in range(500):
            facts, asked = draw_episode(rng, n)
            size = sum(len(f.statement) + len(f.question) + len(f.value) + 2 for f in facts)  # each fact asked
            assert size <= longest_fact(n)
            assert len({f.value for f in facts}) == n and len({f.label for f in facts}) == n
    one = draw_episode(random.Random(7), 3)
    assert one == draw_episode(random.Random(7), 3)


def test_cue_overlap_counts_the_bytes_the_question_ends_with_before_the_value() -> None:
    """Worked by hand: the question (with the space the answer starts with) ends in the 21 bytes
    " The code of Anna is ", as the statement does before the value; "?" and ":" differ next."""
    assert cue_overlap(" Note: The code of Anna is 48213. ", " What is the code of Anna? The code of Anna is",
                       "48213") == len(" The code of Anna is ")
    assert cue_overlap(" 48213 is the code of Anna. ", " Recall the code for Anna:", "48213") == 1  # the space alone
    assert cue_overlap(" The pass key is 48213. Remember it. 48213 is the pass key. ", question(None),
                       "48213") == len(" The pass key is ")  # the benchmark: the first statement counts
    assert cue_overlap(needle(48213, "red"), question("red"), "48213") == len(" The pass key for the red door is ")


def test_facts_record_the_phrasings_they_were_drawn_from() -> None:
    rng = random.Random(5)
    for held_out in (False, True):
        facts, _ = draw_episode(rng, 3, held_out=held_out)
        for fact in facts:
            assert fact.core in (HELD_OUT_CORES if held_out else TRAIN_CORES)
            assert fact.asked in (HELD_OUT_QUESTIONS if held_out else TRAIN_QUESTIONS)
            assert fact.question == fact.asked.format(K=fact.kind, L=fact.label)


def test_a_cloze_question_repeats_the_facts_words_before_its_value() -> None:
    """The question ends with the fact's own words before the value, so the answer's cue repeats
    the fact's in at least 16 bytes (or all of its words, when fewer); a fact whose value opens
    it has nothing to restate and keeps its drawn question. Never a held-out or benchmark phrasing."""
    rng = random.Random(7)
    asked = kept = 0
    held = [_pattern(q) for q in HELD_OUT_QUESTIONS] + [_pattern(c) for c in HELD_OUT_CORES]
    for _ in range(2000):
        fact = draw_episode(rng, 1)[0][0]
        clozed = cloze(rng, fact)
        if not fact.before_value:
            assert clozed == fact
            kept += 1
            continue
        asked += 1
        assert clozed.question.endswith(fact.before_value[1:])
        assert cue_overlap(fact.statement, clozed.question, fact.value) >= min(16, len(fact.before_value))
        assert "pass key" not in clozed.question.lower()
        assert not any(p.search(clozed.question) for p in held), clozed.question
    assert asked > 1500 and kept > 100


def test_the_bound_holds_cloze_questions() -> None:
    rng = random.Random(8)
    for _ in range(3000):
        n = rng.randint(1, 4)
        facts, _ = draw_episode(rng, n)
        facts = [cloze(rng, f) for f in facts]
        used = sum(len(f.statement) + len(f.question) + len(f" {f.value}.") for f in facts)
        assert used <= longest_fact(n, cloze=True)
    assert longest_fact(1, cloze=True) > longest_fact(1)


def test_a_value_is_stated_as_it_is_asked() -> None:
    """Every fact states its value exactly as the answer spells it, also a word value that opens
    its sentence (it was capitalised once: stated "Ember", answered "ember")."""
    rng = random.Random(9)
    opening = 0
    for _ in range(3000):
        fact = draw_episode(rng, 1, value_kind="word")[0][0]
        assert re.search(rf"(?<![\w-]){fact.value}(?![\w-])", fact.statement), fact.statement
        opening += not fact.before_value
    assert opening > 100
