"""kvroute bench: KV memory, peak memory, TTFT, decode speed and capacity per plan."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

NAME = "bench"
#: dests that are no field of BenchConfig (--engine hf) or ServingBenchConfig (--engine vllm)
CLI_ONLY = ("config", "engine", "out")
#: fields filled from another dest: the positional model is ServingBenchConfig's checkpoint
FIELD_DESTS = {"checkpoint": "model"}
HELP = "Benchmark KV memory, TTFT, decode tokens/s and capacity for each sharing plan."
VLLM = "--engine vllm"


def configure(p: argparse.ArgumentParser) -> None:
    from dataclasses import fields

    from kvroute.bench import BenchConfig
    from kvroute.config_cli import add_config_flags, comma_list
    from kvroute.serving_bench import ServingBenchConfig

    p.add_argument("model", nargs="?", default=argparse.SUPPRESS,
                   help="named shape with random weights (smollm2-135m, qwen3-8b-mini, qwen3-8b, llama-3.1-8b, or a "
                        "--preset such as tiny) or a checkpoint folder (default smollm2-135m)")
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                   help="hf: kvroute's transformers path (default); vllm: serving throughput at a fixed KV pool "
                        "(needs vLLM and a checkpoint folder; writes serving.json, serving.md)")
    one = {"nargs": None, "action": None}  # one comma-separated value: --plans full,every:4
    ints = {**one, "type": comma_list(int), "metavar": "N[,N...]"}
    add_config_flags(  # the old spellings first (--context, --batch); flags shared with vLLM name both defaults
        p, BenchConfig, skip={"model"},
        plans={**one, "help": "plan specs, comma-separated (default every:1,2,4,8; --engine vllm: "
                              "full,every:2,every:4)"},
        contexts={**ints, "flags": ["--context", "--contexts"], "help": "prompt lengths, comma-separated "
                                                                        "(default 512)"},
        batches={**ints, "flags": ["--batch", "--batches"], "help": "batch sizes, comma-separated (default 1)"},
        new_tokens={"help": "decode steps per repeat (default 32; --engine vllm: 96)"},
        dtype={"help": "model and cache dtype (default float32; --engine vllm: bfloat16)"},
        kv_budget={"metavar": "SIZE"},
        kv_quant={**one, "help": "KV storage of the plans' caches, comma-separated: none, int8, int4 "
                                 "(default none)"},
    )
    p.add_argument("--out", default="bench_out", help="folder for bench.json, bench.md, bench.png (default bench_out)")
    add_config_flags(p, ServingBenchConfig, skip={"checkpoint"}, config_file=False,
                     groups={f.name: VLLM for f in fields(ServingBenchConfig)}, kv_cache_memory={"metavar": "SIZE"})


def config(args: argparse.Namespace) -> Any:
    """The engine's config: defaults < ``--config FILE`` < flags; the model (positional or file) is the checkpoint."""
    from kvroute.bench import BenchConfig
    from kvroute.config_cli import config_from_args, config_values
    from kvroute.serving_bench import ServingBenchConfig

    values = config_values(BenchConfig, args, also=(ServingBenchConfig,))
    if args.engine == "hf":
        return BenchConfig(**values)
    return config_from_args(ServingBenchConfig, args, also=(BenchConfig,),
                            checkpoint=values.get("model", BenchConfig.model))


def run(args: argparse.Namespace) -> int:
    from kvroute.bench import run_bench, write_report
    from kvroute.serving_bench import run_serving_bench, write_serving_report

    run_, write = (run_bench, write_report) if args.engine == "hf" else (run_serving_bench, write_serving_report)
    cfg = config(args)
    if cfg.threads is not None:  # the one place torch's thread count is set; the library only records it
        import torch

        torch.set_num_threads(cfg.threads)
    report = run_(cfg)
    command = "kvroute " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    paths = write(report, args.out, command=command)
    print(report.table())
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0
