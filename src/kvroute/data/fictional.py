"""A deterministic generator of RepLiQA-like fictional context-QA data.

Every record describes one invented entity (a person, a company, an island or an
animal species) with invented attributes: names made of random syllables, years,
counts. The question asks for one attribute, and the answer is a verbatim span of
the context. Since nothing in it exists, a model can only answer by reading the
context: whether a shared KV cache still carries the facts of the context shows
directly in the score.

Splits are disjoint by construction: every invented name belongs to one split by
a stable hash, so no name of a test context (entity or attribute value) ever
appears in a training context, and each split is the same whatever the size of
the other.

Example:
    >>> records = generate(3, split="test", seed=0)
    >>> all(r["answer"] in r["context"] for r in records)
    True
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

SPLITS = ("train", "test")
_TEST_BUCKETS = 4  # a quarter of the name space belongs to the test split

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gl", "h", "k", "kr", "l", "m", "n", "p", "pr",
           "r", "s", "sk", "t", "th", "tr", "v", "z", "zh", "qu", "w", "y", "c", "st", "fl"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou", "ia", "y"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "m", "x", "nd", "sk"]

_OCCUPATIONS = ["lighthouse keeper", "glassblower", "cartographer", "beekeeper", "clockmaker",
                "ferry pilot", "archivist", "botanist", "violin maker", "tea merchant",
                "stonemason", "puppeteer", "falconer", "bookbinder", "rope maker"]
_PETS = ["cat", "dog", "parrot", "tortoise", "goat", "ferret", "owl", "rabbit"]
_PRODUCTS = ["lantern", "kettle", "bicycle", "telescope", "music box", "umbrella", "compass",
             "typewriter", "sewing machine", "barometer"]
_COLOURS = ["crimson", "teal", "amber", "violet", "silver", "ochre", "indigo", "jade"]
_FOODS = ["river snails", "pine seeds", "moths", "wild figs", "lichen", "small crabs",
          "thistle buds", "beetles"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December"]


def _bucket(name: str) -> str:
    digest = hashlib.sha256(name.lower().encode()).digest()
    return "test" if digest[0] % _TEST_BUCKETS == 0 else "train"


class _Names:
    """Fresh invented names of one split, never repeated within a generation."""

    def __init__(self, rng: random.Random, split: str) -> None:
        self.rng, self.split, self.used = rng, split, set()

    def word(self, syllables: tuple[int, int] = (2, 3)) -> str:
        while True:
            n = self.rng.randint(*syllables)
            parts = [self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(n)]
            name = ("".join(parts) + self.rng.choice(_CODAS)).capitalize()
            if name not in self.used and _bucket(name) == self.split:
                self.used.add(name)
                return name

    def person(self) -> str:
        return f"{self.word()} {self.word((2, 3))}"


def _distinct_ints(rng: random.Random, low: int, high: int, k: int) -> list[int]:
    return rng.sample(range(low, high), k)


# Each builder returns (entity name, context, {attribute: (question, answer)}).
_Builder = Callable[[random.Random, _Names], tuple[str, str, dict[str, tuple[str, str]]]]


def _person(rng: random.Random, names: _Names) -> tuple[str, str, dict[str, tuple[str, str]]]:
    name, town, employer, pet = names.person(), names.word(), names.word(), names.word((2, 2))
    first = name.split()[0]
    year, siblings = rng.randint(1801, 1999), rng.randint(2, 9)
    job, pet_kind = rng.choice(_OCCUPATIONS), rng.choice(_PETS)
    context = (
        f"{name} was born in {year} in the town of {town}. "
        f"{first} grew up with {siblings} siblings and later became a {job} at the {employer} Company. "
        f"Colleagues remember {first} mostly for a {pet_kind} named {pet}, who came to work every day."
    )
    qa = {
        "birth_year": (f"In what year was {name} born?", str(year)),
        "birth_town": (f"In which town was {name} born?", town),
        "employer": (f"For which company did {name} work?", f"{employer} Company"),
        "occupation": (f"What was {name}'s occupation?", job),
        "pet_name": (f"What was the name of {name}'s {pet_kind}?", pet),
        "siblings": (f"How many siblings did {name} grow up with?", str(siblings)),
    }
    return name, context, qa


def _company(rng: random.Random, names: _Names) -> tuple[str, str, dict[str, tuple[str, str]]]:
    name, founder, town, product = names.word(), names.person(), names.word(), names.word((2, 2))
    year, staff = _distinct_ints(rng, 1850, 2020, 1)[0], rng.randint(21, 4000)
    kind = rng.choice(_PRODUCTS)
    context = (
        f"{name} Works is a manufacturer founded in {year} by {founder} in the harbour city of {town}. "
        f"Its best-known product is the {product} {kind}, sold in every shop along the coast. "
        f"Today the firm employs {staff} people."
    )
    qa = {
        "founder": (f"Who founded {name} Works?", founder),
        "founding_year": (f"In what year was {name} Works founded?", str(year)),
        "city": (f"In which city was {name} Works founded?", town),
        "product": (f"What is the name of the best-known {kind} made by {name} Works?", product),
        "staff": (f"How many people does {name} Works employ?", str(staff)),
    }
    return name, context, qa


def _island(rng: random.Random, names: _Names) -> tuple[str, str, dict[str, tuple[str, str]]]:
    name, sea, capital, festival = names.word(), names.word(), names.word(), names.word((2, 2))
    population, area = _distinct_ints(rng, 120, 90000, 2)
    month = rng.choice(_MONTHS)
    context = (
        f"The island of {name} lies in the {sea} Sea and covers {area} hectares. "
        f"Its capital is {capital}, and about {population} people live there. "
        f"Every {month} the islanders celebrate the {festival} festival with boat races."
    )
    qa = {
        "sea": (f"In which sea does the island of {name} lie?", f"{sea} Sea"),
        "capital": (f"What is the capital of {name}?", capital),
        "population": (f"How many people live on {name}?", str(population)),
        "festival": (f"Which festival do the people of {name} celebrate?", f"{festival} festival"),
        "festival_month": (f"In which month is the {festival} festival held on {name}?", month),
    }
    return name, context, qa


def _species(rng: random.Random, names: _Names) -> tuple[str, str, dict[str, tuple[str, str]]]:
    name, valley, discoverer = names.word(), names.word(), names.person()
    colour, food = rng.choice(_COLOURS), rng.choice(_FOODS)
    year, span = rng.randint(1820, 2015), rng.randint(3, 40)
    context = (
        f"The {name} is a small {colour} bird found only in the {valley} Valley. "
        f"It feeds on {food} and lives for about {span} years. "
        f"It was first described in {year} by the naturalist {discoverer}."
    )
    qa = {
        "habitat": (f"Where is the {name} found?", f"{valley} Valley"),
        "colour": (f"What colour is the {name}?", colour),
        "food": (f"What does the {name} feed on?", food),
        "discoverer": (f"Who first described the {name}?", discoverer),
        "year": (f"In what year was the {name} first described?", str(year)),
    }
    return name, context, qa


_BUILDERS: dict[str, _Builder] = {
    "person": _person, "company": _company, "island": _island, "species": _species,
}


def generate(n: int, split: str = "train", seed: int = 0) -> list[dict[str, Any]]:
    """``n`` fictional context-QA records of one split.

    Args:
        n: number of records (one invented entity each).
        split: ``"train"`` or ``"test"``; their entities never overlap.
        seed: same seed and split, same records.

    Returns:
        Records ``{id, split, kind, entity, attribute, context, question, answer}``;
        ``answer`` always occurs verbatim in ``context``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"the number of records must be >= 0, got {n}")
    rng = random.Random(f"kvroute-fictional-qa:{seed}:{split}")
    names = _Names(rng, split)
    kinds = sorted(_BUILDERS)
    records = []
    for i in range(n):
        kind = kinds[i % len(kinds)] if i < len(kinds) else rng.choice(kinds)
        entity, context, qa = _BUILDERS[kind](rng, names)
        attribute = rng.choice(sorted(qa))
        question, answer = qa[attribute]
        assert answer in context, (kind, attribute)
        records.append({
            "id": f"{split}-{seed}-{i}", "split": split, "kind": kind, "entity": entity,
            "attribute": attribute, "context": context, "question": question, "answer": answer,
        })
    return records


def write_jsonl(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Write records one JSON object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def write_fictional_qa(out_dir: str | Path, train: int, test: int, seed: int = 0) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` of fictional context-QA into ``out_dir``.

    Returns:
        ``{"train": path, "test": path}``.

    Example:
        >>> write_fictional_qa("data/fictional", train=2000, test=200, seed=0)  # doctest: +SKIP
    """
    out = Path(out_dir)
    return {
        "train": write_jsonl(generate(train, "train", seed), out / "train.jsonl"),
        "test": write_jsonl(generate(test, "test", seed), out / "test.jsonl"),
    }
