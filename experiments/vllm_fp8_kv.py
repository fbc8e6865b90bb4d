"""Depth-wise sharing x vLLM's fp8 KV cache (issue 16): KV tokens per pool and greedy agreement.

For each plan, one vLLM engine with a bf16 KV cache and one with ``kv_cache_dtype="fp8"``, the
same KV pool (64 MiB) and the same prompts (held-out State of the Union text, the demo's test
split). Reports the KV tokens vLLM's pool holds and how the fp8 run's greedy tokens agree with
the bf16 run's: the share of equal tokens and the position of the first difference.

With ``--ppl`` it also scores held-out perplexity through each engine: ``prompt_logprobs`` over
256-token chunks with chunked prefill of ``--ppl-step`` tokens, so every step attends to the
earlier tokens as stored in the (bf16 or fp8) KV cache, as kvroute's own quantized eval does.
The first step's tokens are not scored (they see no cache).

    .venv-vllm/bin/python experiments/vllm_fp8_kv.py [--checkpoint runs/demo-former/rcla-cal] \
        [--out experiments/results/vllm_fp8_kv.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="runs/demo-former/rcla-cal")
    ap.add_argument("--text", default="runs/demo/data/sotu-2007-2021", help="held-out text folder (.txt)")
    ap.add_argument("--plans", default="full,every:2,every:4")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--kv-cache-memory", type=int, default=64 * 2**20)
    ap.add_argument("--ppl", action="store_true", help="also held-out perplexity through each engine's cache")
    ap.add_argument("--ppl-chunks", type=int, default=16, help="256-token chunks scored with --ppl")
    ap.add_argument("--ppl-step", type=int, default=32, help="chunked-prefill step (tokens) with --ppl")
    ap.add_argument("--out", default="experiments/results/vllm_fp8_kv.json")
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    import kvroute
    from kvroute.vllm import hf_overrides

    tok = kvroute.load_tokenizer(args.checkpoint)
    text = "\n\n".join(p.read_text() for p in sorted(Path(args.text).glob("*.txt")))
    ids = tok(text)["input_ids"]
    step = max(1, (len(ids) - args.prompt_tokens) // args.prompts)
    prompts = [ids[i * step : i * step + args.prompt_tokens] for i in range(args.prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    ppl_len = args.prompt_tokens
    ppl_step = max(1, (len(ids) - ppl_len) // max(args.ppl_chunks, 1))
    ppl_chunks = [ids[i * ppl_step : i * ppl_step + ppl_len] for i in range(args.ppl_chunks)] if args.ppl else []
    scoring = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    runs: dict[str, dict] = {}
    for plan in args.plans.split(","):
        for kv in ("auto", "fp8"):
            chunked = dict(enable_chunked_prefill=True, max_num_batched_tokens=args.ppl_step) if args.ppl else {}
            llm = LLM(model=args.checkpoint, hf_overrides=hf_overrides(args.checkpoint, plan), dtype="bfloat16",
                      kv_cache_dtype=kv, kv_cache_memory_bytes=args.kv_cache_memory, enforce_eager=True, seed=0,
                      max_model_len=args.prompt_tokens + args.new_tokens, max_num_seqs=args.prompts,
                      distributed_executor_backend="uni", enable_prefix_caching=False, **chunked)
            cache = llm.llm_engine.vllm_config.cache_config
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            runs[f"{plan}/{kv}"] = {"kv_tokens": cache.num_gpu_blocks * cache.block_size,
                                    "tokens": [list(o.outputs[0].token_ids) for o in outs]}
            if ppl_chunks:
                scored = llm.generate([{"prompt_token_ids": c} for c in ppl_chunks], scoring, use_tqdm=False)
                nll = [-lp[t].logprob for o, c in zip(scored, ppl_chunks)
                       for t, lp in zip(c[args.ppl_step:], o.prompt_logprobs[args.ppl_step:])]
                runs[f"{plan}/{kv}"]["ppl"] = math.exp(sum(nll) / len(nll))
                runs[f"{plan}/{kv}"]["ppl_tokens"] = len(nll)
            del llm
            gc.collect()
    rows = []
    base_tokens = runs[f"{args.plans.split(',')[0]}/auto"]["kv_tokens"]
    for plan in args.plans.split(","):
        ref, fp8 = runs[f"{plan}/auto"], runs[f"{plan}/fp8"]
        equal = [sum(a == b for a, b in zip(x, y)) for x, y in zip(ref["tokens"], fp8["tokens"])]
        first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                 for x, y in zip(ref["tokens"], fp8["tokens"])]
        for kv, run in (("bf16", ref), ("fp8", fp8)):
            rows.append({"plan": plan, "kv_cache_dtype": kv, "kv_tokens": run["kv_tokens"],
                         "kv_tokens_vs_full_bf16": run["kv_tokens"] / base_tokens,
                         **{k: run[k] for k in ("ppl", "ppl_tokens") if k in run}})
        rows[-1].update({"greedy_agreement_vs_bf16": sum(equal) / sum(len(x) for x in ref["tokens"]),
                         "first_difference_median": sorted(first)[len(first) // 2]})
        if "ppl" in fp8:
            rows[-1]["ppl_vs_bf16"] = fp8["ppl"] / ref["ppl"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
