"""The passkey benchmark's own sentences (``horizon passkey --wording benchmark``). The training
mix never states them (:mod:`horizonlm.data.episodes` has no phrasing that says "pass key", and
a test checks it); it takes only the door names from here."""

from __future__ import annotations

DOORS = ("blue", "red", "green", "yellow", "white", "black", "grey", "brown")
"""Labels of the keys when several are hidden; the question names one."""


def needle(key: int, door: str | None) -> str:
    """The fact, stated once: the key, then the key again."""
    if door is None:
        return f" The pass key is {key}. Remember it. {key} is the pass key. "
    return f" The pass key for the {door} door is {key}. Remember it. {key} is the pass key for the {door} door. "


def question(door: str | None) -> str:
    """The end of a prompt; the answer follows as " 48213."."""
    if door is None:
        return " What is the pass key? The pass key is"
    return f" What is the pass key for the {door} door? The pass key for the {door} door is"
