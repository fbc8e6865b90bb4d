"""kvroute bench: KV memory, peak memory, TTFT, decode speed and capacity per plan."""

from __future__ import annotations

import argparse
import shlex
import sys

NAME = "bench"
HELP = "Benchmark KV memory, TTFT, decode tokens/s and capacity for each sharing plan."


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="smollm2-135m",
                   help="named shape with random weights (smollm2-135m, qwen3-8b-mini, qwen3-8b, llama-3.1-8b) "
                        "or a checkpoint folder (default smollm2-135m)")
    p.add_argument("--plans", help="plan specs (default every:1,2,4,8; --engine vllm: full,every:2,every:4)")
    p.add_argument("--context", type=_ints, default=[512], help="prompt lengths, comma-separated (default 512)")
    p.add_argument("--batch", type=_ints, default=[1], help="batch sizes, comma-separated (default 1)")
    p.add_argument("--new-tokens", type=int, help="decode steps per repeat (default 32; --engine vllm: 96)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; medians are reported (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repeats first (default 1)")
    p.add_argument("--dtype", help="model and cache dtype (default float32; --engine vllm: bfloat16)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--kv-budget", help="KV memory budget for the largest-batch column, e.g. 1GiB")
    p.add_argument("--kv-quant", default="none",
                   help="KV storage of the plans' caches, comma-separated: none, int8, int4 (default none)")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmodified-transformers row")
    p.add_argument("--random-weights", action="store_true", help="a checkpoint's config with random weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_out", help="folder for bench.json, bench.md, bench.png (default bench_out)")
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                   help="hf: kvroute's transformers path (default); vllm: serving throughput at a fixed KV pool "
                        "(needs vLLM and a checkpoint folder; writes serving.json, serving.md)")
    v = p.add_argument_group("--engine vllm")
    v.add_argument("--kv-cache-memory", default="64MiB", help="KV pool of every plan (default 64MiB)")
    v.add_argument("--requests", type=int, default=48, help="requests sent at once (default 48)")
    v.add_argument("--prompt-tokens", type=int, default=200, help="random prompt tokens per request (default 200)")
    v.add_argument("--max-num-seqs", type=int, default=256, help="vLLM's cap on running requests (default 256)")


def run(args: argparse.Namespace) -> int:
    from kvroute.bench import BenchConfig, run_bench, write_report
    from kvroute.budget import parse_bytes

    if args.engine == "vllm":
        return _run_vllm(args)

    config = BenchConfig(
        model=args.model, plans=args.plans or "every:1,2,4,8", contexts=args.context, batches=args.batch,
        new_tokens=args.new_tokens or 32, repeats=args.repeats, warmup=args.warmup, dtype=args.dtype or "float32",
        device=args.device, threads=args.threads,
        kv_budget=parse_bytes(args.kv_budget) if args.kv_budget else None,
        baseline=not args.no_baseline, random_weights=args.random_weights, seed=args.seed,
        kv_quant=args.kv_quant,
    )
    return _report(run_bench(config), write_report, args.out)


def _report(report, write, out: str) -> int:
    """Write the report files (with the command that made them) and print the table."""
    command = "kvroute " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    paths = write(report, out, command=command)
    print(report.table())
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _run_vllm(args: argparse.Namespace) -> int:
    from kvroute.budget import parse_bytes
    from kvroute.serving_bench import ServingBenchConfig, run_serving_bench, write_serving_report

    config = ServingBenchConfig(
        checkpoint=args.model, plans=args.plans or "full,every:2,every:4",
        kv_cache_memory=parse_bytes(args.kv_cache_memory), requests=args.requests, prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens or 96, max_num_seqs=args.max_num_seqs, dtype=args.dtype or "bfloat16",
        threads=args.threads, seed=args.seed,
    )
    return _report(run_serving_bench(config), write_serving_report, args.out)
