"""kvroute generate: stream a completion under a sharing plan."""

from __future__ import annotations

import argparse
import sys

NAME = "generate"
HELP = "Generate text from a checkpoint under a sharing plan, streaming tokens."


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="kvroute or HF checkpoint folder, hub id or .gguf file")
    p.add_argument("prompt", help="the prompt (a user message with --chat)")
    p.add_argument("--plan", default=None, help="sharing plan, e.g. every:4 (default: the checkpoint's)")
    p.add_argument("--chat", action="store_true", help="use the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--kv-quant", default="none", help="owners store KV as none, int8 or int4 (default none)")


def run(args: argparse.Namespace) -> int:
    from kvroute.generate import generate
    from kvroute.kvquant import KVQuant
    from kvroute.models import load, load_tokenizer

    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    model = load(args.checkpoint, plan=args.plan, dtype=args.dtype, device=args.device)
    tokenizer = load_tokenizer(args.checkpoint)
    result = generate(
        model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, chat=args.chat,
        temperature=args.temperature, seed=args.seed, kv_quant=KVQuant.parse(args.kv_quant) or "none",
        on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()),
    )
    print()
    print(result.summary(), file=sys.stderr)
    return 0
