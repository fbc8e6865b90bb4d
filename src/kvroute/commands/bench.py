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
    p.add_argument("--plans", default="every:1,2,4,8", help="plan specs (default every:1,2,4,8)")
    p.add_argument("--context", type=_ints, default=[512], help="prompt lengths, comma-separated (default 512)")
    p.add_argument("--batch", type=_ints, default=[1], help="batch sizes, comma-separated (default 1)")
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps per repeat (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; medians are reported (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repeats first (default 1)")
    p.add_argument("--dtype", default="float32", help="model and cache dtype (default float32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--kv-budget", help="KV memory budget for the largest-batch column, e.g. 1GiB")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmodified-transformers row")
    p.add_argument("--random-weights", action="store_true", help="a checkpoint's config with random weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_out", help="folder for bench.json, bench.md, bench.png (default bench_out)")


def run(args: argparse.Namespace) -> int:
    from kvroute.bench import BenchConfig, run_bench, write_report
    from kvroute.budget import parse_bytes

    config = BenchConfig(
        model=args.model, plans=args.plans, contexts=args.context, batches=args.batch,
        new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup, dtype=args.dtype,
        device=args.device, threads=args.threads,
        kv_budget=parse_bytes(args.kv_budget) if args.kv_budget else None,
        baseline=not args.no_baseline, random_weights=args.random_weights, seed=args.seed,
    )
    report = run_bench(config)
    command = "kvroute " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    paths = write_report(report, args.out, command=command)
    print(report.table())
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0
