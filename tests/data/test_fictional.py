"""The fictional context-QA generator: deterministic, answerable from context, entity-disjoint splits."""

from __future__ import annotations

import json

import pytest

from kvroute.cli import main
from kvroute.data.fictional import generate, write_fictional_qa


def test_deterministic_and_seeded():
    assert generate(30, "train", seed=3) == generate(30, "train", seed=3)
    assert generate(30, "train", seed=3) != generate(30, "train", seed=4)
    assert generate(10, "train", seed=3) == generate(30, "train", seed=3)[:10]


def test_every_answer_is_in_its_context():
    for split in ("train", "test"):
        records = generate(200, split, seed=1)
        assert len(records) == 200
        assert {r["kind"] for r in records} == {"person", "company", "island", "species"}
        for r in records:
            assert r["answer"] and r["answer"] in r["context"]
            assert r["entity"] in r["context"] and r["entity"] in r["question"]
        assert len({r["entity"] for r in records}) == 200  # one new entity per record


def test_train_and_test_entities_are_disjoint():
    train, test = generate(400, "train", seed=0), generate(100, "test", seed=0)
    assert not {r["entity"] for r in train} & {r["entity"] for r in test}
    train_text = " ".join(r["context"] for r in train)
    for r in test:  # no test entity is even mentioned in a training context
        assert r["entity"] not in train_text


def test_writes_jsonl_and_test_split_does_not_depend_on_train_size(tmp_path):
    a = write_fictional_qa(tmp_path / "a", train=5, test=7, seed=2)
    b = write_fictional_qa(tmp_path / "b", train=50, test=7, seed=2)
    assert a["test"].read_text() == b["test"].read_text()
    rows = [json.loads(line) for line in a["train"].read_text().splitlines()]
    assert len(rows) == 5 and all({"context", "question", "answer"} <= set(r) for r in rows)


def test_cli_writes_both_splits(tmp_path, capsys):
    assert main(["data", "fictional-qa", "--out", str(tmp_path), "--train", "4", "--test", "3", "--seed", "5"]) == 0
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 4
    assert len((tmp_path / "test.jsonl").read_text().splitlines()) == 3
    assert "wrote" in capsys.readouterr().out


def test_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        generate(3, "dev")
    with pytest.raises(ValueError, match=">= 0"):
        generate(-1)
