"""The one kit of tiny offline text, tokenizers and checkpoint folders (models: conftest.tiny_model).

Two tokenizers: a word-level one (:func:`make_tokenizer`, for the counting text of
:func:`write_corpus`) and a character-level one (:func:`tiny_tokenizer`, for free text).
:func:`make_model_dir` saves a tiny model with either.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3: pad, bos, eos (as in conftest's tiny configs)
WORDS = [f"w{i}" for i in range(40)]
CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"
VOCAB = 128  # model vocabulary that covers the character-level tokenizer


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


def tiny_tokenizer():
    """A character-level fast tokenizer (BPE without merges), built offline; ids below :data:`VOCAB`."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    assert len(vocab) <= VOCAB
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_lm(family: str = "llama", layers: int = 4, seed: int = 0):
    """conftest's tiny model with a vocabulary that fits :func:`tiny_tokenizer`."""
    from conftest import tiny_model

    return tiny_model(family, layers, seed, vocab=VOCAB)


def make_model_dir(folder: Path, family: str = "llama", layers: int = 4, seed: int = 0,
                   tokenizer: str = "words") -> Path:
    """A tiny model plus a tokenizer (``"words"``: :func:`make_tokenizer`, ``"chars"``: :func:`tiny_tokenizer`),
    saved as one plain HF checkpoint folder."""
    from conftest import tiny_model

    if tokenizer == "chars":
        tiny_lm(family, layers, seed).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
    else:
        tiny_model(family, layers, seed).save_pretrained(folder)
        make_tokenizer(folder)
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


def greedy_without_cache(model, ids: list[int], steps: int, eos: int) -> list[int]:
    """Greedy continuation by full forwards (no cache): the reference for cached decoding."""
    import torch

    out = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            out.append(int(model(torch.tensor([out]), use_cache=False).logits[0, -1].argmax()))
            if out[-1] == eos:
                break
    return out[len(ids) :]
