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


#: per kind: the context (lines up to the first blank one, joined by spaces), then one
#: ``attribute: question = answer`` line per attribute; all formatted with the entity's facts
_TEMPLATES = {
    "person": """
{name} was born in {year} in the town of {town}.
{first} grew up with {siblings} siblings and later became a {job} at the {employer} Company.
Colleagues remember {first} mostly for a {pet_kind} named {pet}, who came to work every day.

birth_year: In what year was {name} born? = {year}
birth_town: In which town was {name} born? = {town}
employer: For which company did {name} work? = {employer} Company
occupation: What was {name}'s occupation? = {job}
pet_name: What was the name of {name}'s {pet_kind}? = {pet}
siblings: How many siblings did {name} grow up with? = {siblings}
""",
    "company": """
{name} Works is a manufacturer founded in {year} by {founder} in the harbour city of {town}.
Its best-known product is the {product} {kind}, sold in every shop along the coast.
Today the firm employs {staff} people.

founder: Who founded {name} Works? = {founder}
founding_year: In what year was {name} Works founded? = {year}
city: In which city was {name} Works founded? = {town}
product: What is the name of the best-known {kind} made by {name} Works? = {product}
staff: How many people does {name} Works employ? = {staff}
""",
    "island": """
The island of {name} lies in the {sea} Sea and covers {area} hectares.
Its capital is {capital}, and about {population} people live there.
Every {month} the islanders celebrate the {festival} festival with boat races.

sea: In which sea does the island of {name} lie? = {sea} Sea
capital: What is the capital of {name}? = {capital}
population: How many people live on {name}? = {population}
festival: Which festival do the people of {name} celebrate? = {festival} festival
festival_month: In which month is the {festival} festival held on {name}? = {month}
""",
    "species": """
The {name} is a small {colour} bird found only in the {valley} Valley.
It feeds on {food} and lives for about {span} years.
It was first described in {year} by the naturalist {discoverer}.

habitat: Where is the {name} found? = {valley} Valley
colour: What colour is the {name}? = {colour}
food: What does the {name} feed on? = {food}
discoverer: Who first described the {name}? = {discoverer}
year: In what year was the {name} first described? = {year}
""",
}


def _person(rng: random.Random, names: _Names) -> dict[str, Any]:
    name, town, employer, pet = names.person(), names.word(), names.word(), names.word((2, 2))
    year, siblings = rng.randint(1801, 1999), rng.randint(2, 9)
    job, pet_kind = rng.choice(_OCCUPATIONS), rng.choice(_PETS)
    return {"name": name, "first": name.split()[0], "town": town, "employer": employer, "pet": pet,
            "year": year, "siblings": siblings, "job": job, "pet_kind": pet_kind}


def _company(rng: random.Random, names: _Names) -> dict[str, Any]:
    name, founder, town, product = names.word(), names.person(), names.word(), names.word((2, 2))
    year, staff = _distinct_ints(rng, 1850, 2020, 1)[0], rng.randint(21, 4000)
    return {"name": name, "founder": founder, "town": town, "product": product, "year": year,
            "staff": staff, "kind": rng.choice(_PRODUCTS)}


def _island(rng: random.Random, names: _Names) -> dict[str, Any]:
    name, sea, capital, festival = names.word(), names.word(), names.word(), names.word((2, 2))
    population, area = _distinct_ints(rng, 120, 90000, 2)
    return {"name": name, "sea": sea, "capital": capital, "festival": festival, "population": population,
            "area": area, "month": rng.choice(_MONTHS)}


def _species(rng: random.Random, names: _Names) -> dict[str, Any]:
    name, valley, discoverer = names.word(), names.word(), names.person()
    colour, food = rng.choice(_COLOURS), rng.choice(_FOODS)
    year, span = rng.randint(1820, 2015), rng.randint(3, 40)
    return {"name": name, "valley": valley, "discoverer": discoverer, "colour": colour, "food": food,
            "year": year, "span": span}


# Each builder draws one entity's facts, in a fixed order of random draws.
_BUILDERS: dict[str, Callable[[random.Random, _Names], dict[str, Any]]] = {
    "person": _person, "company": _company, "island": _island, "species": _species,
}


def _entity(kind: str, facts: dict[str, Any]) -> tuple[str, str, dict[str, tuple[str, str]]]:
    """(entity name, context, {attribute: (question, answer)}) of one kind's facts."""
    context, _, questions = _TEMPLATES[kind].strip().partition("\n\n")
    qa = {}
    for line in questions.splitlines():
        attribute, _, pair = line.partition(": ")
        question, _, answer = pair.partition(" = ")
        qa[attribute] = (question.format(**facts), answer.format(**facts))
    return facts["name"], context.replace("\n", " ").format(**facts), qa


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
        entity, context, qa = _entity(kind, _BUILDERS[kind](rng, names))
        attribute = rng.choice(sorted(qa))
        question, answer = qa[attribute]
        assert answer in context, (kind, attribute)
        records.append({
            "id": f"{split}-{seed}-{i}", "split": split, "kind": kind, "entity": entity,
            "attribute": attribute, "context": context, "question": question, "answer": answer,
        })
    return records


def write_jsonl(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Write records one JSON object per line, all or nothing (a temporary file, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    partial.replace(path)
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
