"""Texts no other test in the session has used, in the test models' word vocabulary.

A hex suffix does not make a text unique for a word-level tokenizer: every unknown word is the same unknown
token, so two such texts get the same token ids and the same content key. These words are all in the
vocabulary (``k0..k63``, ``v0..v63``), and a session-wide counter makes each call's words new.
"""
from __future__ import annotations

import itertools
import uuid

_COUNTER = itertools.count(uuid.uuid4().int % (1 << 20))


def unique_words() -> str:
    """Four in-vocabulary words that no earlier call in this process returned (64^4 combinations)."""
    n = next(_COUNTER) % (64 ** 4)
    d = [(n >> (6 * i)) & 63 for i in range(4)]
    return f"k{d[0]} v{d[1]} k{d[2]} v{d[3]}"
