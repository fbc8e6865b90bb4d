"""Tiny offline checkpoints for the eval tests: a char-level tokenizer and a small random model."""

from __future__ import annotations

import string
from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"
VOCAB = 128


def tiny_tokenizer():
    """A character-level fast tokenizer (BPE without merges), built offline."""
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
    """A random tiny causal LM whose vocabulary fits :func:`tiny_tokenizer`."""
    import torch
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, layers)
    config.vocab_size = VOCAB
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def save_tiny_checkpoint(path: Path, family: str = "llama", layers: int = 4, seed: int = 0) -> Path:
    """Write a tiny model and its tokenizer as a plain HF checkpoint folder."""
    tiny_lm(family, layers, seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
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
