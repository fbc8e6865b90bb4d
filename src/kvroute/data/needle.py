"""Context QA with the fact buried in real text: fictional paragraphs placed inside held-out passages.

Each record takes a record of :mod:`kvroute.data.fictional` (an invented entity, so only the
context can answer; the test split unless told otherwise) and places its context paragraph at a
sentence boundary inside a passage of about ``words`` words of real text (held-out speeches, a
novel). The question and answer stay the fictional record's. Against the fictional set alone, the
context is several times longer, most of it real text that says nothing about the question, and
the fact sits at any depth: the record's ``depth`` is the share of the passage's words before it.
Under a shared KV cache the answer has to come back from deep in a long context, through layers
that read another layer's keys and values. Sentence boundaries come from
:func:`kvroute.data.text.sentence_starts`, a heuristic: ``Mr. Starbuck`` holds one.

Example:
    >>> texts = ["One sentence here. " * 200]
    >>> r = needle_records(texts, n=2, words=60, seed=0)[0]
    >>> r["answer"] in r["context"] and r["fact"] in r["context"]
    True
"""

from __future__ import annotations

import random
from typing import Any

from kvroute.data.fictional import generate
from kvroute.data.text import sentence_starts


def needle_records(texts: list[str], n: int, words: int = 250, seed: int = 0,
                   split: str = "test") -> list[dict[str, Any]]:
    """``n`` context-QA records whose context is a fictional paragraph inside a real passage.

    Args:
        texts: the real text, one string per document.
        n: records to make.
        words: words of real text around each fictional paragraph (whole sentences: a passage
            starts at a sentence start and ends at a sentence end, at ``words`` or just past).
        seed: same seed and texts, same records.
        split: the fictional split the facts come from (``test`` to evaluate, ``train`` to fine-tune
            on: entity-disjoint, as in :mod:`kvroute.data.fictional`); with ``seed`` it picks the same
            facts as ``generate(n, split, seed)``.

    Returns:
        Records ``{id, split, kind, entity, attribute, context, question, answer, fact, depth,
        document}``: ``fact`` is the fictional paragraph, ``depth`` the share of the passage's
        words before it (0: first, 1: last), ``document`` the index of the text it came from.

    Raises:
        ValueError: when no document holds a passage of ``words`` words.
    """
    if n < 1 or words < 1:
        raise ValueError(f"need at least one record and one word of passage, got n={n}, words={words}")
    rng = random.Random(f"kvroute-needle-qa:{seed}")
    docs = [" ".join(t.split()) for t in texts]
    # a passage is whole sentences from one start until ``words`` words are reached
    openings = []  # (document, first character, end character)
    for d, doc in enumerate(docs):
        bounds = sentence_starts(doc) + [len(doc)]
        counts = [len(doc[a:b].split()) for a, b in zip(bounds, bounds[1:])]
        last, total = 0, 0  # sentences first..last-1 hold ``total`` words
        for first in range(len(counts)):
            while total < words and last < len(counts):
                total, last = total + counts[last], last + 1
            if total < words:
                break  # later starts have fewer words after them
            openings.append((d, bounds[first], bounds[last]))
            total -= counts[first]
    if not openings:
        raise ValueError(f"no document has {words} words of whole sentences; give more text or fewer --words")
    records = []
    for facts in generate(n, split, seed):
        d, start, end = openings[rng.randrange(len(openings))]
        passage = docs[d][start:end].strip()
        cuts = sentence_starts(passage) + [len(passage)]
        cut = rng.choice(cuts)
        before, after = passage[:cut].strip(), passage[cut:].strip()
        context = " ".join(part for part in (before, facts["context"], after) if part)
        depth = len(before.split()) / max(1, len(before.split()) + len(after.split()))
        records.append({**facts, "id": f"needle-{facts['id']}", "context": context, "fact": facts["context"],
                        "depth": round(depth, 3), "document": d})
    return records
