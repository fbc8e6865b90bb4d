"""Tiny offline text, tokenizer and model folders for the data and training tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3: pad, bos, eos (as in conftest's tiny configs)
WORDS = [f"w{i}" for i in range(40)]


def make_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer (44 tokens) saved as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS + ["Context:", "Question:", "Answer:"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return folder


def document(seed: int, length: int = 60) -> str:
    """Counting text (w3 w4 w5 ...): the next word is predictable, so the loss drops fast."""
    start = random.Random(seed).randrange(len(WORDS))
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(length))


def write_corpus(folder: Path, docs: int = 12, length: int = 60) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        (folder / f"doc_{i:02d}.txt").write_text(document(i, length))
    return folder


def write_qa(path: Path, n: int = 16) -> Path:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        ctx = " ".join(rng.choice(WORDS) for _ in range(12))
        rows.append({"context": ctx, "question": " ".join(rng.choice(WORDS) for _ in range(3)),
                     "answer": " ".join(rng.choice(WORDS) for _ in range(2))})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_model_dir(folder: Path, family: str = "llama", layers: int = 4) -> Path:
    """A tiny routed-family model plus the tiny tokenizer, saved as one checkpoint folder."""
    from conftest import tiny_model

    tiny_model(family, layers=layers).save_pretrained(folder)
    make_tokenizer(folder)
    return folder
