"""Memory per GPU of a kvroute FSDP2 fine-tune (``kvroute train --fsdp``), from the model's shape.

An estimate from the terms that dominate, each printed, so that it can be checked and
adjusted. What kvroute's training holds on each of G GPUs:

- sharded state (exact): fp32 weights, fp32 gradients and AdamW's two fp32 moments,
  16 bytes per parameter, divided over G;
- gathered layers: FSDP2 all-gathers one decoder layer for compute and prefetches the next,
  2 layers of fp32 weights (and their gradients in backward);
- activations under bf16 autocast: with ``--gradient-checkpointing`` the input of every
  layer plus one layer recomputed in full; without it every layer's saved tensors;
- the loss: fp32 logits over the vocabulary, their log-softmax and its gradient (3 copies),
  plus the bf16 logits autocast produced.

R-CLA adds no weights and no optimizer state; a routed pass only skips K/V projections,
so its memory is at most that of the unrouted model. Allocator fragmentation, CUDA
context (~0.5-1 GiB) and communication buffers come on top: keep 10-15% headroom.

Usage::

    python scripts/fsdp_memory.py --shape llama-3.1-8b --gpus 8 --seq-len 4096 --batch-size 1 --checkpointing
    python scripts/fsdp_memory.py --config path/to/config.json --gpus 8 --seq-len 2048 --batch-size 2
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from kvroute.shapes import SHAPES as NAMED_SHAPES

GIB = 1024**3

#: the named shapes of well-known models (kvroute.shapes.SHAPES, from their published config.json files;
#: the pre-training presets have no vocabulary, so they are left out)
SHAPES = {name: fields for name, fields in NAMED_SHAPES.items() if "vocab_size" in fields}


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: dict) -> "Shape":
        heads = int(cfg["num_attention_heads"])
        return cls(int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"]), heads,
                   int(cfg.get("num_key_value_heads", heads)), int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
                   int(cfg["vocab_size"]), bool(cfg.get("tie_word_embeddings", False)))

    def layer_params(self) -> int:
        """One decoder layer (Llama/Qwen/Mistral layout: q, k, v, o, gated MLP, two RMSNorms)."""
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return attn + 3 * self.hidden * self.intermediate + 2 * self.hidden

    def params(self) -> int:
        embed = self.vocab * self.hidden
        return self.layers * self.layer_params() + embed * (1 if self.tied else 2) + self.hidden


def estimate(shape: Shape, gpus: int, seq_len: int, batch: int, checkpointing: bool) -> dict[str, float]:
    """Bytes per GPU by term."""
    tokens = batch * seq_len
    n = shape.params()
    bf16 = 2
    # per layer, bf16 activations saved for backward under autocast (attention via SDPA/flash:
    # no T x T scores): inputs of norms, q/k/v/o, the MLP's three projections and its activation
    per_layer_act = tokens * bf16 * (
        4 * shape.hidden + shape.head_dim * (2 * shape.heads + 2 * shape.kv_heads) + 3 * shape.intermediate)
    if checkpointing:
        act = shape.layers * tokens * shape.hidden * bf16 + per_layer_act
    else:
        act = shape.layers * per_layer_act
    return {
        "sharded weights + grads + AdamW (16 B/param / G)": 16 * n / gpus,
        "gathered layers (2 x fp32 weights and grads)": 2 * 2 * 4 * shape.layer_params(),
        "activations (bf16)": act,
        "logits and loss (bf16 + 3 x fp32)": tokens * shape.vocab * (bf16 + 3 * 4),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--shape", choices=sorted(SHAPES))
    src.add_argument("--config", type=Path, help="a model's config.json")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=1, help="per GPU")
    ap.add_argument("--checkpointing", action="store_true", help="--gradient-checkpointing")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if min(args.gpus, args.seq_len, args.batch_size) <= 0:
        ap.error("--gpus, --seq-len and --batch-size must be positive")
    cfg = SHAPES[args.shape] if args.shape else json.loads(args.config.read_text())
    shape = Shape.from_config(cfg.get("text_config", cfg))
    terms = estimate(shape, args.gpus, args.seq_len, args.batch_size, args.checkpointing)
    total = sum(terms.values())
    if args.json:
        print(json.dumps({"params": shape.params(), "terms_bytes": terms, "total_bytes": total}, indent=2))
        return 0
    print(f"{args.shape or args.config}: {shape.params() / 1e9:.2f}B parameters, {args.gpus} GPUs, "
          f"{args.batch_size} x {args.seq_len} tokens per GPU, checkpointing {'on' if args.checkpointing else 'off'}")
    for name, value in terms.items():
        print(f"  {name:52s} {value / GIB:7.2f} GiB")
    print(f"  {'total (add 10-15% headroom)':52s} {total / GIB:7.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
