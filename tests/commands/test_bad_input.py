"""Bad input gets one clear line (rc 2, the flag or file named), never a traceback: every command, table-driven."""

from __future__ import annotations

from pathlib import Path

import pytest
from textkit import make_model_dir, write_corpus

from kvroute.cli import main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    ckpt = make_model_dir(root / "ckpt", tokenizer="chars")
    latin1 = root / "latin1"
    latin1.mkdir()
    (latin1 / "a.txt").write_text("plain text " * 20)
    (latin1 / "b.txt").write_bytes("Stra\xdfe und Gr\xfc\xdfe ".encode("latin-1") * 10)
    (root / "fake.gguf").write_bytes(b"not a gguf at all")
    (root / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x07")  # the magic, then the header breaks off
    (root / "bad.jsonl").write_text('{"context": "x", "question": "y"\n')
    return {"ckpt": ckpt, "text": write_corpus(root / "text"), "latin1": latin1, "fake": root / "fake.gguf",
            "cut": root / "cut.gguf", "bad_jsonl": root / "bad.jsonl", "missing": root / "missing", "out": root / "out"}


# (argv with {placeholders}, what the one-line error must say)
CASES = [
    # train
    (["train", "{missing}", "--data", "{text}"], "checkpoint not found"),
    (["train", "{fake}", "--data", "{text}"], "fake.gguf: not a GGUF file"),
    (["train", "{cut}", "--data", "{text}"], "cut.gguf: cannot read this GGUF file"),
    (["train", "{ckpt}", "--data", "{latin1}", "-o", "{out}"], "b.txt: not UTF-8 text (byte 0xdf"),
    (["train", "{ckpt}", "--data", "{missing}"], "missing"),
    (["train", "{ckpt}", "--data", "{text}", "--seq-len", "0"], "--seq-len must be a positive integer"),
    (["train", "{ckpt}", "--data", "{text}", "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["train", "{ckpt}", "--data", "{text}", "--grad-accum", "0"], "--grad-accum must be a positive integer"),
    (["train", "{ckpt}", "--data", "{text}", "--lr", "-1"], "--lr must be positive"),
    (["train", "{ckpt}", "--data", "{text}", "--p", "1.5"], "--p must be in [0, 1]"),
    (["train", "{ckpt}", "--data", "{text}", "--routing", "bogus"], "--routing"),
    (["train", "{ckpt}", "--data", "{text}", "--eval-plans", "every:0"], "every"),
    (["train", "{ckpt}", "--data", "{text}", "--warmup", "1.5"], "--warmup must be in [0, 1)"),
    (["train", "{ckpt}", "--data", "{text}", "--seq-len", "100000"], "--seq-len 100000 is above"),
    (["train", "{ckpt}", "--data", "{text}", "--resume", "{missing}"], "--resume: checkpoint not found"),
    (["train", "{ckpt}", "--data", "{text}", "--fsdp", "--lora-r", "4"], "--fsdp with LoRA"),
    (["train", "{ckpt}", "--data", "{bad_jsonl}", "-o", "{out}"], "bad.jsonl"),
    # eval
    (["eval", "{missing}", "--text", "{text}"], "not found"),
    (["eval", "{ckpt}", "--text", "{latin1}", "--out", "{out}"], "b.txt: not UTF-8 text"),
    (["eval", "{ckpt}", "--text", "{text}", "--window", "0"], "--window must be positive"),
    (["eval", "{ckpt}", "--text", "{text}", "--window", "8", "--stride", "9"], "--stride must be in 1..--window"),
    (["eval", "{ckpt}", "--text", "{text}", "--plans", "every:x"], "every"),
    (["eval", "{ckpt}", "--text", "{text}", "--limit", "0"], "--limit must be positive"),
    (["eval", "{ckpt}"], "give at least one dataset"),
    (["eval", "{ckpt}", "--qa", "{bad_jsonl}"], "bad.jsonl"),
    # generate
    (["generate", "{missing}", "hi"], "not found"),
    (["generate", "{ckpt}", "hi", "--plan", "groups:9"], "groups"),
    (["generate", "{fake}", "hi"], "not a GGUF file"),
    # calibrate
    (["calibrate", "{ckpt}", "--plans", "every:2", "--data", "{missing}"], "not found"),
    (["calibrate", "{ckpt}", "--plans", "every:2", "--data", "{latin1}"], "b.txt: not UTF-8 text"),
    (["calibrate", "{ckpt}", "--plans", "bogus:1", "--data", "{text}"], "bogus"),
    # plan
    (["plan", "show", "{ckpt}", "--plan", "every:0"], "every"),
    (["plan", "budget", "{ckpt}", "--memory", "lots"], "cannot read memory size 'lots'"),
    (["plan", "search", "{ckpt}", "--budget", "0.5", "--data", "{latin1}"], "b.txt: not UTF-8 text"),
    # bench and serve
    (["bench", "{ckpt}", "--plans", "every:0", "--out", "{out}"], "every"),
    (["bench", "{ckpt}", "--kv-budget", "lots", "--out", "{out}"], "cannot read memory size 'lots'"),
    (["serve", "{ckpt}", "--plan", "groups:9", "--dry-run"], "groups"),
    (["serve", "{ckpt}", "--kv-cache-memory=-1GiB", "--dry-run"], "memory size"),
    (["train", "{ckpt}", "--data", "{text}", "--seq-len", "many"], "--seq-len: invalid int value"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a[:2]) + f" [{i}]" for i, (a, _) in enumerate(CASES)])
def test_bad_input_gets_one_clear_line(inputs, argv, message, capsys):
    args = [a.format(**{k: str(v) for k, v in inputs.items()}) for a in argv]
    try:
        rc = main(args)
    except SystemExit as exit_:  # argparse's own errors: also one line, also rc 2
        rc = exit_.code
    captured = capsys.readouterr()
    assert rc == 2, captured.out[-2000:] + captured.err[-2000:]
    assert "Traceback" not in captured.err
    error_lines = [line for line in captured.err.splitlines() if ": error: " in line]
    assert len(error_lines) == 1 and message in error_lines[0], captured.err[-2000:]

