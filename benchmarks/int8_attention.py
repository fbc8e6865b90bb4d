"""One layer's one-token decode attention over an int8 KV history on CPU: where the time goes.

Issue 20 asks int8 decode to run at 0.9x the unquantized plan or better. This times, for one
layer of the SmolLM2-135M shape (9 query heads, 3 KV heads, head size 64) and a context of
``--context`` tokens (the newest 32 in full precision, as kvroute's quantized cache keeps them):

- ``unquantized``: packed-GQA sdpa over bf16 K/V (what an unquantized cache runs);
- ``dequantize``: what kvroute runs for int8: each history is cast to bf16 and multiplied by its
  scales into one buffer with the residual, then the same sdpa;
- ``folded``: attention written out so that the history is only cast, never multiplied: scores
  ``q . codes`` times the key scales (float32), probabilities times the value scales;
- ``cast only``: the two casts of the history and nothing else, a floor for any path that feeds
  int8 codes to a bf16 matmul.

Medians of ``--repeats`` rounds; also the largest difference of ``folded`` from ``dequantize``.
On this 2-core machine ``folded`` wins with one thread and loses with two (many small ops, each
split across the threads), so kvroute keeps ``dequantize`` (docs/RESULTS.md, issue 20).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/int8_attention.py --threads 1 --out docs/bench/int8_attention_1k_t1.json
    OMP_WAIT_POLICY=PASSIVE python benchmarks/int8_attention.py --threads 2 --out docs/bench/int8_attention_1k_t2.json

Not a test: its numbers go into the docs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from kvroute.kvquant import KVQuant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--residual", type=int, default=32)
    parser.add_argument("--calls", type=int, default=500, help="calls per timing round")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch, kv_heads, groups, dim, dtype = 1, 3, 3, 64, torch.bfloat16
    old, rest = args.context - args.residual, args.residual
    g = torch.Generator().manual_seed(0)
    quant = KVQuant(8)
    history = [torch.randn(batch, kv_heads, old, dim, generator=g).to(dtype) for _ in range(2)]
    (ck, sk), (cv, sv) = (quant.quantize(x, torch.bfloat16) for x in history)
    rk, rv = (torch.randn(batch, kv_heads, rest, dim, generator=g).to(dtype) for _ in range(2))
    query = torch.randn(batch, kv_heads, groups, dim, generator=g).to(dtype)  # packed: a KV head's query heads as rows
    scale = dim ** -0.5
    full_k, full_v = (torch.cat((quant.dequantize(c, s, dtype), r), -2) for c, s, r in ((ck, sk, rk), (cv, sv, rv)))

    def unquantized() -> torch.Tensor:
        return F.scaled_dot_product_attention(query, full_k, full_v, scale=scale)

    def dequantize() -> torch.Tensor:
        kv = []
        for c, s, r in ((ck, sk, rk), (cv, sv, rv)):
            out = r.new_empty((batch, kv_heads, old + rest, dim))
            quant.dequantize(c, s, dtype, out=out[:, :, :old])
            out[:, :, old:].copy_(r)
            kv.append(out)
        return F.scaled_dot_product_attention(query, kv[0], kv[1], scale=scale)

    def folded() -> torch.Tensor:
        q = query * scale
        scores = torch.cat(((q @ ck.to(dtype).transpose(-1, -2)).float() * sk.float().transpose(-1, -2),
                            (q @ rk.transpose(-1, -2)).float()), -1)
        p = scores.softmax(-1)
        out = (p[..., :old] * sv.float().transpose(-1, -2)).to(dtype) @ cv.to(dtype)
        return out + p[..., old:].to(dtype) @ rv

    def cast_only() -> None:
        ck.to(dtype), cv.to(dtype)

    ways = {"unquantized": unquantized, "dequantize": dequantize, "folded": folded, "cast only": cast_only}
    times: dict[str, list[float]] = {name: [] for name in ways}
    with torch.inference_mode():
        for f in ways.values():
            for _ in range(20):
                f()
        for _ in range(args.repeats):
            for name, f in ways.items():
                start = time.perf_counter()
                for _ in range(args.calls):
                    f()
                times[name].append(1e6 * (time.perf_counter() - start) / args.calls)
        diff = (folded().float() - dequantize().float()).abs().max().item()
    result = {"context": args.context, "residual": args.residual, "threads": args.threads,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "torch": torch.__version__,
              "us_per_layer": {name: round(statistics.median(t), 1) for name, t in times.items()},
              "folded_max_abs_diff_from_dequantize": round(diff, 4)}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
