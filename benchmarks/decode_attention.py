"""Decode step time on CPU: kvroute's packed one-token attention against transformers' sdpa path.

For a single query token without a mask, transformers' ``sdpa`` attention passes ``enable_gqa=True``
to ``scaled_dot_product_attention``; on CPU in bf16 that kernel is several times slower than the
same attention with each KV head's group of query heads packed as rows (what transformers itself
does when there is a mask). kvroute's routed attention takes the packed path on CPU
(:func:`kvroute.hf.attention.packed_decode`). This times greedy decode steps both ways in one
run, round-robin, and checks that both generate the same tokens.

Random weights of a named shape (default SmolLM2-135M: 30 layers, 9 heads, 3 KV heads) or a
checkpoint folder; the prompt is random token ids.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/decode_attention.py --context 1024 --plans full,every:2,every:4 \\
        --out docs/bench/decode_attention.json
    OMP_WAIT_POLICY=PASSIVE python benchmarks/decode_attention.py --model runs/demo-former/rcla-cal --kv-quant int8 \\
        --threads 1 --out docs/bench/int8_decode_t1.json

Not a test: its numbers go into the docs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import kvroute
from kvroute.hf.attention import RoutedAttention
from kvroute.shapes import is_shape, random_model


def decode_ms(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> tuple[float, torch.Tensor]:
    """Milliseconds per decode step (``steps + 1`` tokens minus one token, over ``steps``) and the tokens."""
    def run(n: int) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - start, out

    one, _ = run(1)
    many, out = run(steps + 1)
    return 1000 * (many - one) / steps, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a named shape (random weights) or a checkpoint")
    parser.add_argument("--plans", default="full,every:2,every:4")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if is_shape(args.model):
        model = kvroute.apply(random_model(args.model, dtype=args.dtype))
    else:
        model = kvroute.load(args.model, dtype=args.dtype)
    model.generation_config.pad_token_id = model.generation_config.eos_token_id = None
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (1, args.context), generator=torch.Generator().manual_seed(0))
    packed = RoutedAttention._packed_decode

    def way(name: str) -> None:
        """Decode through transformers' sdpa path or the packed one."""
        RoutedAttention._packed_decode = (lambda self, query, mask: False) if name == "transformers" else packed

    names = ["transformers", "packed"]
    rows = []
    with torch.inference_mode():
        for plan in args.plans.split(","):
            kvroute.set_plan(model, plan)
            times: dict[str, list[float]] = {name: [] for name in names}
            tokens = {}
            for _ in range(args.repeats):
                for name in names:
                    way(name)
                    ms, tokens[name] = decode_ms(model, ids, args.steps)
                    times[name].append(ms)
            way("packed")
            row = {"plan": plan, **{f"{name}_ms_per_step": round(statistics.median(t), 2) for name, t in times.items()}}
            base, *others = names
            for name in others:
                row[f"{name}_vs_{base}"] = round(row[f"{base}_ms_per_step"] / row[f"{name}_ms_per_step"], 3)
                row[f"{name}_same_tokens"] = bool(torch.equal(tokens[base], tokens[name]))
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {"model": args.model, "context": args.context, "steps": args.steps,
              "repeats": args.repeats, "dtype": args.dtype, "threads": args.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "torch": torch.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
