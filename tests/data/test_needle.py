"""Needle QA: fictional test facts placed whole, at a sentence boundary, inside passages of real text."""

from __future__ import annotations

import json

import pytest

from kvroute.cli import main
from kvroute.data.fictional import generate
from kvroute.data.needle import needle_records
from kvroute.data.qa import read_qa

#: 60 numbered sentences of 5 words each, over two documents
DOCS = [" ".join(f"Sentence {i} has five words." for i in range(k, k + 30)) for k in (0, 30)]


def test_each_fact_sits_whole_between_sentences_of_one_passage():
    records = needle_records(DOCS, n=40, words=20, seed=3)
    facts = generate(40, "test", seed=3)
    assert len(records) == 40
    for r, f in zip(records, facts):
        assert (r["question"], r["answer"], r["fact"], r["entity"]) == (f["question"], f["answer"], f["context"],
                                                                         f["entity"])
        before, _, after = r["context"].partition(r["fact"])
        passage = " ".join(p for p in (before.strip(), after.strip()) if p)
        # whole sentences of one document, 20 words (four sentences), in order: a passage of the real text
        assert passage in DOCS[r["document"]] and len(passage.split()) == 20
        assert before in ("", *[s + " " for s in _prefixes(passage)])  # the cut falls between sentences
        assert r["depth"] == pytest.approx(len(before.split()) / 20, abs=1e-3)
    assert {r["depth"] for r in records} == {0.0, 0.25, 0.5, 0.75, 1.0}  # every boundary is used
    assert {r["document"] for r in records} == {0, 1}
    assert needle_records(DOCS, n=40, words=20, seed=3) == records
    assert needle_records(DOCS, n=40, words=20, seed=4) != records


def _prefixes(passage: str) -> list[str]:
    sentences = [s + "." for s in passage.rstrip(".").split(". ")]
    return [" ".join(sentences[:k]) for k in range(1, len(sentences) + 1)]


def test_a_passage_runs_past_words_to_end_a_sentence_and_too_little_text_is_an_error():
    records = needle_records(DOCS, n=5, words=7, seed=0)  # 7 words: two whole sentences, 10 words
    assert all(len(r["context"].replace(r["fact"], "").split()) == 10 for r in records)
    with pytest.raises(ValueError, match="no document has 151 words"):
        needle_records(DOCS, n=5, words=151)
    with pytest.raises(ValueError, match="at least one record"):
        needle_records(DOCS, n=0)


def test_cli_writes_records_kvroute_eval_reads(tmp_path, capsys):
    for k, doc in enumerate(DOCS):
        (tmp_path / f"{k}.txt").write_text(doc)
    out = tmp_path / "needle.jsonl"
    assert main(["data", "needle-qa", "--text", str(tmp_path), "--out", str(out), "--n", "6", "--words", "20",
                 "--seed", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == needle_records(DOCS, n=6, words=20, seed=1)
    assert [r.answers for r in read_qa([str(out)])] == [(r["answer"],) for r in rows]
    train = tmp_path / "train.jsonl"  # --split train: the facts training (or a plan search) may see
    assert main(["data", "needle-qa", "--text", str(tmp_path), "--out", str(train), "--n", "6", "--words", "20",
                 "--seed", "1", "--split", "train"]) == 0
    assert [json.loads(line) for line in train.read_text().splitlines()] == needle_records(
        DOCS, n=6, words=20, seed=1, split="train") != rows


def test_training_records_take_the_train_split_facts():
    train = needle_records(DOCS, n=8, words=20, seed=0, split="train")
    assert [r["fact"] for r in train] == [f["context"] for f in generate(8, "train", seed=0)]
    assert [r["id"] for r in train] == [f"needle-train-0-{i}" for i in range(8)]
    test_entities = {r["entity"] for r in needle_records(DOCS, n=40, words=20, seed=0)}
    assert test_entities and not test_entities & {r["entity"] for r in train}
