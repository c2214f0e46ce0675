"""Generated recall episodes: labelled facts stated in prose, asked for later.

A model trained on one fixed sentence learns that sentence, not recall. Episodes here are drawn
from a grammar: a fact is ``opener + core + closer``, where the core names a label and its value
in one of many phrasings (the label before the value, after it, or more than 16 bytes before
it), and a question is one of many phrasings that ends where the answer starts. Labels are
drawn from several families (doors, people, places, accounts, ...) and values are of several
kinds (5-digit numbers, words, codes).

Two things never appear in a training episode, and a test checks both:
- the benchmark's own sentences (:mod:`horizonlm.data.needles`; no training phrasing says
  "pass key"), so ``horizon passkey`` in its wording asks a phrasing the model never saw;
- the held-out phrasings (``HELD_OUT_*``), which ``horizon passkey --wording heldout`` asks.
Which cores and questions are held out is fixed here, in code, not drawn at random.
"""

from __future__ import annotations

import functools
import itertools
import random
import re
from dataclasses import dataclass, replace

KINDS = ("code", "number", "password", "combination", "PIN", "access code", "secret number", "serial number",
         "reference", "locker number", "ticket number", "token")
"""What a value is called. Never "pass key": that is the benchmark's word."""

LABELS = {
    "door": ("the {c} door", ("blue", "red", "green", "yellow", "white", "black", "grey", "brown", "orange",
                              "purple", "silver", "golden")),
    "person": ("{c}", ("Anna", "Boris", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas",
                       "Keiko", "Luis", "Mara", "Nils", "Olga", "Pavel", "Rosa", "Tomas", "Ursula", "Viktor")),
    "place": ("the {c}", ("north gate", "old mill", "harbour office", "east tower", "library vault", "chapel",
                          "boathouse", "west wing", "cellar", "lighthouse", "granary", "signal box")),
    "thing": ("the {c}", ("red suitcase", "iron chest", "small safe", "wooden box", "tin trunk", "blue locker",
                          "oak cabinet", "music box", "brass case", "travel bag")),
}
"""Label families: a pattern and its fillers."""

WORDS = ("amber", "falcon", "granite", "harbor", "juniper", "lantern", "meadow", "nutmeg", "orchid", "pepper",
         "quartz", "raven", "saffron", "thistle", "velvet", "willow", "cobalt", "ember", "glacier", "hazel")
"""Word values."""

OPENERS = ("", "Note: ", "Remember this. ", "For the record, ", "Please note that ", "Important: ",
           "As agreed, ", "Write this down: ", "One more thing. ", "By the way, ")
CLOSERS = ("", " Keep it safe.", " Do not forget it.", " It will be needed later.", " Tell no one.",
           " That is all.", " Memorise it.")

# {L}: the label, {K}: the kind of value, {V}: the value. The cores differ in where the label
# stands: right before the value, after it, or a clause away (more than 16 bytes before it).
TRAIN_CORES = (
    "the {K} of {L} is {V}.",
    "the {K} for {L} is {V}.",
    "{L} has the {K} {V}.",
    "{L}'s {K} is {V}.",
    "for {L}, the {K} is {V}.",
    "{V} is the {K} of {L}.",
    "{V} is the {K} for {L}.",
    "the {K} assigned to {L} is {V}.",
    "{L} was given the {K} {V}.",
    "to open {L}, use the {K} {V}.",
    "{L}: {K} {V}.",
    "we set the {K} of {L} to {V}.",
    "{L}, as you asked, now has a new {K}, and it is {V}.",
    "about {L}: after a long discussion the {K} was fixed at {V}.",
    "the {K} that belongs to {L} reads {V}.",
    "{L} can be reached with the {K} {V}.",
    "if anyone asks about {L}, the {K} is {V}.",
    "{V}, that is the {K} of {L}.",
)
HELD_OUT_CORES = (
    "the {K} used by {L} is {V}.",
    "{L} goes with the {K} {V}.",
    "regarding {L}, which we spoke of before, its {K} is {V}.",
    "{V} is what {L} uses as its {K}.",
)

# A question ends where the answer starts; the answer is " {V}." after it.
TRAIN_QUESTIONS = (
    " What is the {K} of {L}? The {K} of {L} is",
    " What is the {K} for {L}? It is",
    " Which {K} does {L} have? Answer:",
    " Tell me the {K} of {L}. The {K} is",
    " Do you remember the {K} for {L}? Yes, it is",
    " Question: the {K} of {L}? Answer:",
    " What was {L}'s {K}? It was",
    " Now, the {K} of {L} was",
    " Recall the {K} for {L}:",
    " I need the {K} of {L}. It is",
)
HELD_OUT_QUESTIONS = (
    " Which {K} goes with {L}? The {K} is",
    " Can you tell me what {L} uses as its {K}? It is",
)

# A cloze question ends with the fact's own words before its value, after one of these leads
# ({L}: the label): the answer's cue then repeats the fact's (see cue_overlap).
CLOZE_LEADS = ("", "Back to {L}. ", "Question: ", "Remind me: ", "Once more: ", "Recall it: ", "So, ",
               "As noted before, ", "Earlier we said: ", "Complete this: ")


def _labels() -> list[str]:
    return [pattern.format(c=c) for pattern, fillers in LABELS.values() for c in fillers]


@functools.cache
def train_templates() -> tuple[tuple[str, str, str], ...]:
    """Every (opener, core, closer) the training mix states facts with (built once: every fact
    of every training window draws from it)."""
    return tuple(itertools.product(OPENERS, TRAIN_CORES, CLOSERS))


@functools.cache
def held_out_templates() -> tuple[tuple[str, str, str], ...]:
    """Every (opener, core, closer) with a held-out core: never stated in training."""
    return tuple(itertools.product(OPENERS, HELD_OUT_CORES, CLOSERS))


def _sentence_case(text: str) -> str:
    return text[:1].upper() + text[1:]


def _opens_sentence(prefix: str) -> bool:
    """Whether text after ``prefix`` (an opener or a cloze lead) begins a sentence of its own."""
    return prefix == "" or prefix.endswith((". ", ": "))


@dataclass(frozen=True)
class Fact:
    """One labelled value, stated and asked."""

    label: str
    kind: str
    value: str
    statement: str
    """The fact as it stands in the text, with a space before it and after it."""
    question: str
    """The end of a prompt that asks for it; the answer " {value}." follows."""
    core: str = ""
    """The core phrasing it was stated in (one of ``TRAIN_CORES`` or ``HELD_OUT_CORES``)."""
    asked: str = ""
    """The question phrasing it was asked in (one of ``TRAIN_QUESTIONS`` or ``HELD_OUT_QUESTIONS``)."""
    before_value: str = ""
    """The fact's own words from its core's start to its value, as the core writes them (not
    sentence-cased; empty when the value opens the fact)."""


def value_text(rng: random.Random, value_kind: str) -> str:
    """A value of one kind: ``digits`` (5 digits), ``word`` or ``code`` (letters and digits)."""
    if value_kind == "digits":
        return str(rng.randint(10000, 99999))
    if value_kind == "word":
        return rng.choice(WORDS)
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    return "".join(rng.choice(letters) for _ in range(2)) + "-" + str(rng.randint(100, 999))


def make_fact(rng: random.Random, label: str, value: str, held_out: bool = False) -> Fact:
    """A fact about ``label`` in a phrasing drawn from the training set (or the held-out set)."""
    opener, core, closer = rng.choice(held_out_templates() if held_out else train_templates())
    kind = rng.choice(KINDS)
    words = core.format(K=kind, L=label, V=value)
    # a sentence of its own starts with a capital, unless it starts with the value ("ember" is asked as "ember")
    body = _sentence_case(words) if _opens_sentence(opener) and not words.startswith(value) else words
    statement = f" {opener}{body}{closer} "
    asked = rng.choice(HELD_OUT_QUESTIONS if held_out else TRAIN_QUESTIONS)
    question = asked.format(K=kind, L=label)
    return Fact(label=label, kind=kind, value=value, statement=statement, question=question, core=core, asked=asked,
                before_value=words[: value_at(words, value)].rstrip())


def value_at(text: str, value: str) -> int:
    """Where ``value`` first stands in ``text`` as a word of its own (the word value "ember" is
    not the one inside "Remember")."""
    found = re.search(rf"(?<![\w-]){re.escape(value)}(?![\w-])", text)
    if found is None:
        raise ValueError(f"{value!r} is not a word of {text!r}")
    return found.start()


def cloze(rng: random.Random, fact: Fact) -> Fact:
    """``fact`` asked with a cloze question (a lead, then its own words before the value), or
    as it is when its value opens it (nothing to restate)."""
    if not fact.before_value:
        return fact
    lead = rng.choice(CLOZE_LEADS)
    words = fact.before_value
    if _opens_sentence(lead):
        words = _sentence_case(words)
    return replace(fact, question=f" {lead.format(L=fact.label)}{words}", asked=lead + "<cloze>")


def cue_overlap(statement: str, question: str, value: str) -> int:
    """Bytes the answer's cue shares with the value's: the longest common suffix of the question
    followed by the space the answer starts with, and the statement up to the value's first
    character. An induction key over the last n bytes (the default memory's ``memory_key_span``)
    finds the value by exact match only when this is at least n; below it the question's context
    matches the fact's in fewer bytes, as it matches many other places in the text."""
    cue = (question + " ").encode()
    before = statement[: value_at(statement, value)].encode()
    n = 0
    while n < min(len(cue), len(before)) and cue[-1 - n] == before[-1 - n]:
        n += 1
    return n


def draw_episode(rng: random.Random, n_facts: int, held_out: bool = False,
                 value_kind: str | None = None) -> tuple[list[Fact], int]:
    """``n_facts`` facts with distinct labels and values, and which one is asked. With several
    facts they share a label family, so only the label tells them apart."""
    family = rng.choice(list(LABELS))
    pattern, fillers = LABELS[family]
    labels = [pattern.format(c=c) for c in rng.sample(fillers, n_facts)]
    kinds = ("digits", "word", "code")
    values: list[str] = []
    while len(values) < n_facts:
        value = value_text(rng, value_kind or rng.choice(kinds))
        if value not in values:
            values.append(value)
    return [make_fact(rng, label, value, held_out) for label, value in zip(labels, values)], rng.randrange(n_facts)


def longest_fact(n_facts: int, cloze: bool = False) -> int:
    """A bound on the bytes ``n_facts`` facts and a question with its answer for each take (for
    window sizes); ``cloze``: some questions may be cloze questions."""
    label = max(map(len, _labels()))
    kind = max(map(len, KINDS))
    value = max(len("99999"), max(map(len, WORDS)), len("AB-999"))
    core = max(len(c) for c in TRAIN_CORES + HELD_OUT_CORES) + 2 * kind + label + value
    fact = max(map(len, OPENERS)) + core + max(map(len, CLOSERS)) + 2
    question = max(len(q) for q in TRAIN_QUESTIONS + HELD_OUT_QUESTIONS) + 2 * kind + 2 * label
    if cloze:  # a lead naming the label, then at most the core's words before its value
        question = max(question, max(map(len, CLOZE_LEADS)) + label + max(map(len, TRAIN_CORES)) + kind + label)
    return n_facts * (fact + question + value + 2)


__all__ = ["Fact", "cloze", "cue_overlap", "draw_episode", "make_fact", "train_templates", "held_out_templates",
           "longest_fact", "value_at", "value_text", "KINDS", "LABELS", "TRAIN_CORES", "HELD_OUT_CORES",
           "TRAIN_QUESTIONS", "HELD_OUT_QUESTIONS", "CLOZE_LEADS"]
