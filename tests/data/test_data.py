"""Text packing, the token cache, QA records and the answer-only collator."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kvroute.data import text as text_data
from kvroute.data.qa import (IGNORE_INDEX, QACollator, QADataset, QARecord, answer_batches, qa_prompt_ids, read_qa,
                             split_records)
from kvroute.data.text import load_text_splits, pack, parse_hf_source, resolve_files, token_stream
from kvroute.models import load_tokenizer
from textkit import make_tokenizer, write_corpus


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer"))


def test_resolve_files_takes_files_folders_and_globs(tmp_path):
    corpus = write_corpus(tmp_path / "c", docs=3)
    (corpus / "skip.json").write_text("{}")
    one = corpus / "doc_00.txt"
    assert resolve_files([str(corpus)]) == sorted(corpus.glob("*.txt"))
    assert resolve_files([str(tmp_path / "c" / "*.txt"), str(one)]) == sorted(corpus.glob("*.txt"))
    with pytest.raises(FileNotFoundError, match="file not found"):
        resolve_files([str(tmp_path / "missing.txt")])
    with pytest.raises(FileNotFoundError, match="matches no file"):
        resolve_files([str(tmp_path / "*.nothing")])
    with pytest.raises(FileNotFoundError, match="has no"):
        resolve_files([str(tmp_path / "c")], suffixes=(".jsonl",))


def test_documents_are_separated_by_eos(tmp_path, tok):
    (tmp_path / "a.txt").write_text("w1 w2 w3")
    (tmp_path / "b.txt").write_text("w4 w5")
    stream = token_stream([str(tmp_path)], tok, cache_dir=False)
    ids = tok.convert_tokens_to_ids
    assert stream.tolist() == [*ids(["w1", "w2", "w3"]), tok.eos_token_id, *ids(["w4", "w5"]), tok.eos_token_id]


def test_pack_cuts_blocks_and_holds_out_the_tail():
    stream = torch.arange(103).numpy()
    train, val = pack(stream, seq_len=10, val_fraction=0.2)
    assert len(train) == 8 and len(val) == 2  # 10 blocks, remainder of 3 dropped
    assert train[0]["input_ids"].tolist() == list(range(10))
    assert val[1]["input_ids"].tolist() == list(range(90, 100))
    assert torch.equal(train[3]["labels"], train[3]["input_ids"])
    with pytest.raises(ValueError, match="fewer than one --seq-len block"):
        pack(stream, seq_len=200)


def test_token_cache_skips_tokenizing_and_follows_file_changes(tmp_path, tok, monkeypatch):
    corpus = write_corpus(tmp_path / "c", docs=2)
    cache = tmp_path / "cache"
    first = token_stream([str(corpus)], tok, cache_dir=cache)
    assert len(list(cache.glob("*.npy"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again")
    monkeypatch.setattr(text_data, "_tokenize", fail)
    assert (token_stream([str(corpus)], tok, cache_dir=cache) == first).all()
    monkeypatch.undo()

    (corpus / "doc_00.txt").write_text("w1 w2")
    os.utime(corpus / "doc_00.txt", ns=(1, 1))
    changed = token_stream([str(corpus)], tok, cache_dir=cache)
    assert len(changed) != len(first) and len(list(cache.glob("*.npy"))) == 2


def test_empty_text_is_refused(tmp_path, tok):
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(ValueError, match="no text"):
        load_text_splits([str(tmp_path)], tok, seq_len=8, cache_dir=False)


def test_hf_source_syntax():
    assert parse_hf_source("hf:wikitext:wikitext-2-raw-v1@validation") == (
        "wikitext", "wikitext-2-raw-v1", "validation")
    assert parse_hf_source("hf:Skylion007/openwebtext") == ("Skylion007/openwebtext", None, "train")
    with pytest.raises(ValueError, match="names no dataset"):
        parse_hf_source("hf:")


# ------------------------------------------------------------------------------------ QA
def test_read_qa_names_the_bad_line(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"context": "c", "question": "q", "answer": "a"}) + "\n"
                    + json.dumps({"context": "c", "question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"qa.jsonl:2: missing field\(s\) 'answer'"):
        read_qa([str(path)])
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="qa.jsonl:1: not valid JSON"):
        read_qa([str(path)])
    path.write_text("\n")
    with pytest.raises(ValueError, match="no QA records"):
        read_qa([str(path)])


def test_split_records_holds_out_a_fraction():
    records = [QARecord(f"c{i}", "q", ("a",)) for i in range(20)]
    train, val = split_records(records, 0.25, seed=1)
    assert len(val) == 5 and sorted(r.context for r in train + val) == sorted(r.context for r in records)


def test_evaluation_prompts_as_qa_fine_tuning_does(tok):
    """The evaluation prompt is the context-first training example up to its answer."""
    record = QARecord("w1 w2 w3", "w4 w5", ("w6",))
    trained = QADataset([record], tok, seq_len=64).encode(record, question_first=False)
    prompt = trained["input_ids"][trained["labels"] == IGNORE_INDEX].tolist()
    assert qa_prompt_ids(tok, record) == prompt


def test_collator_masks_exactly_the_non_answer_tokens(tok):
    records = [QARecord("w1 w2 w3 w4", "w5 w6", ("w7 w8",)), QARecord("w9", "w10", ("w11",))]
    ds = QADataset(records, tok, seq_len=64)
    batch = QACollator(tok.pad_token_id)([ds.encode(records[0], False), ds.encode(records[1], True)])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    answers = [tok.convert_tokens_to_ids(["w7", "w8"]) + [tok.eos_token_id],
               tok.convert_tokens_to_ids(["w11"]) + [tok.eos_token_id]]
    for row, answer in enumerate(answers):
        n = int(mask[row].sum())
        kept = labels[row] != IGNORE_INDEX
        assert kept.sum() == len(answer)
        assert kept[n - len(answer):n].all() and not kept[: n - len(answer)].any() and not kept[n:].any()
        assert labels[row][kept].tolist() == answer == ids[row, n - len(answer):n].tolist()
        assert (ids[row, n:] == tok.pad_token_id).all()
    assert mask.shape == ids.shape == labels.shape


def test_answer_batches_are_the_evaluation_prompt_then_the_answer(tok):
    """Plan search's QA loss: each row is qa_prompt_ids, then the first answer and EOS, labelled on those only;
    similar lengths share a batch and no context is cut, however long."""
    long = " ".join(f"w{i % 40}" for i in range(300))
    records = [QARecord(long, "w1", ("w2 w3", "w4")), QARecord("w5", "w6", ("w7",)), QARecord("w8 w9", "w10", ("w11",))]
    batches = answer_batches(records, tok, batch_size=2)
    assert [len(b["input_ids"]) for b in batches] == [2, 1]
    rows = [(ids[mask == 1].tolist(), labels[mask == 1].tolist())
            for b in batches for ids, labels, mask in zip(b["input_ids"], b["labels"], b["attention_mask"])]
    by_prompt_length = [records[1], records[2], records[0]]
    for (ids, labels), record in zip(rows, by_prompt_length):
        prompt = qa_prompt_ids(tok, record)
        answer = tok(" " + record.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ids == prompt + answer
        assert labels == [IGNORE_INDEX] * len(prompt) + answer
    assert len(rows[-1][0]) > 300  # the long context whole
    with pytest.raises(ValueError, match="batch size"):
        answer_batches(records, tok, batch_size=0)
    with pytest.raises(ValueError, match="no QA records"):
        answer_batches([], tok)


def test_question_order_is_a_seeded_fair_coin(tok):
    record = QARecord("w1 w2", "w3", ("w4",))
    ds = QADataset([record] * 400, tok, seq_len=64, seed=3)
    firsts = [ds.question_first(i) for i in range(400)]
    assert 160 < sum(firsts) < 240
    assert firsts == [QADataset([record] * 400, tok, seq_len=64, seed=3).question_first(i) for i in range(400)]
    question, context = tok.convert_tokens_to_ids(["Question:", "Context:"])
    q_first = ds.encode(record, True)["input_ids"].tolist()
    c_first = ds.encode(record, False)["input_ids"].tolist()
    assert q_first.index(question) < q_first.index(context)
    assert c_first.index(context) < c_first.index(question)
    ds.set_epoch(1)
    assert [ds.question_first(i) for i in range(400)] != firsts


def test_long_context_is_cut_so_the_answer_fits(tok):
    record = QARecord(" ".join(["w1"] * 100), "w2", ("w3 w4",))
    item = QADataset([record], tok, seq_len=20).encode(record, False)
    assert len(item["input_ids"]) == 20
    assert item["labels"][-3:].tolist() == [*tok.convert_tokens_to_ids(["w3", "w4"]), tok.eos_token_id]
    with pytest.raises(ValueError, match="more than --seq-len"):
        QADataset([record], tok, seq_len=5).encode(record, False)


def test_one_text_resolver_serves_training_evaluation_and_calibration(tmp_path):
    from kvroute.data.text import load_eval_text, read_documents, read_texts

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("alpha")
    (tmp_path / "c" / "b.md").write_text("  ")
    lines = tmp_path / "t.jsonl"
    lines.write_text(json.dumps({"text": "beta"}) + "\n" + json.dumps({"text": "gamma"}) + "\n")
    assert read_texts([tmp_path / "c", lines]) == ["alpha", "  ", "beta", "gamma"]
    assert [name for name, _ in read_documents([lines])] == [f"{lines}:1", f"{lines}:2"]
    held = load_eval_text(tmp_path / "c")
    assert held.texts == ("alpha",) and held.files == (str(tmp_path / "c" / "a.txt"),)
    with pytest.raises(FileNotFoundError, match="--text: file not found"):
        load_eval_text(tmp_path / "missing.txt")
    lines.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="t.jsonl:1: no 'text' text field"):
        read_texts([lines])


def test_one_qa_record_for_training_and_evaluation(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"context": "c", "question": "q", "answer": ["a", "b"], "id": "x"}) + "\n"
                    + json.dumps({"context": "c", "question": "q", "answer": {"text": ["s"]}}) + "\n")
    first, second = read_qa([str(path)])
    assert first == QARecord("c", "q", ("a", "b"), "x") and first.answer == "a"
    assert second.answers == ("s",) and second.id == "2"
    assert read_qa([str(path)], limit=1) == [first]
    with pytest.raises(ValueError, match="non-empty tuple of strings"):
        QARecord("c", "q", "a")
    path.write_text(json.dumps({"context": "c", "question": "q", "answer": []}) + "\n")
    with pytest.raises(ValueError, match="qa.jsonl:1: 'answer' must be a string or a non-empty list"):
        read_qa([str(path)])
