"""kvroute plan: show a plan's memory, turn a memory budget into owner layers, search the best plan."""

from __future__ import annotations

import argparse
import sys

NAME = "plan"
#: dests of ``plan search`` that are no SearchConfig field (``plan show`` and ``plan budget`` have no config:
#: their few flags are declared by hand)
CLI_ONLY = ("config", "out")
HELP = "Show a sharing plan's KV memory, size a memory budget, or search the best plan for a budget."


def configure(p: argparse.ArgumentParser) -> None:
    from kvroute.config_cli import add_config_flags
    from kvroute.search_run import SearchConfig

    sub = p.add_subparsers(dest="plan_command", metavar="ACTION", required=True)
    model_help = ("named shape (smollm2-135m, qwen3-8b, qwen3-8b-mini, llama-3.1-8b, or a --preset such as "
                  "qwen3-1.7b), checkpoint folder or .gguf")

    show = sub.add_parser("show", help="each layer's source, the owners, KV bytes vs full")
    show.add_argument("model", help=model_help + " (only the config is read)")
    show.add_argument("--plan", required=True, help="plan spec: full, every:K, keep:F, layers:..., groups:...")
    _memory_args(show, batch=1, context=4096)
    show.add_argument("--kv-quant", default="none", help="owners store KV as none, int8 or int4 (default none)")
    show.set_defaults(_action=_show)

    budget = sub.add_parser("budget", help="how many owner layers a KV memory budget allows")
    budget.add_argument("model", help=model_help + " (only the config is read)")
    budget.add_argument("--memory", required=True, help="KV memory budget, e.g. 6GiB, 512MB")
    _memory_args(budget, batch=1, context=4096)
    budget.set_defaults(_action=_budget)

    search = sub.add_parser("search", help="the owner set that minimizes loss on calibration text "
                                           "(or on the answers of QA records, --qa)")
    search.add_argument("model", help="checkpoint folder, hub id or .gguf (weights and tokenizer are loaded)")
    add_config_flags(search, SearchConfig, skip={"model"}, kv_dtype={"flags": ["--dtype"]})  # as show, budget
    search.add_argument("--out", help="write the result (plan, table) as JSON here")
    search.set_defaults(_action=_search)


def _memory_args(p: argparse.ArgumentParser, batch: int, context: int | None) -> None:
    p.add_argument("--batch", type=int, default=batch, help=f"sequences (default {batch})")
    p.add_argument("--context", type=int, default=context, help=f"tokens per sequence (default {context})")
    p.add_argument("--dtype", default="bf16", help="KV cache dtype for the accounting (default bf16)")


def run(args: argparse.Namespace) -> int:
    return args._action(args)


def _show(args: argparse.Namespace) -> int:
    from kvroute.budget import plan_report
    from kvroute.plan import KVShape, SharingPlan
    from kvroute.shapes import resolve_config

    config = resolve_config(args.model)
    plan = SharingPlan.for_model(args.plan, config)
    print(plan_report(plan, KVShape.from_config(config), args.batch, args.context, args.dtype, args.kv_quant))
    return 0


def _budget(args: argparse.Namespace) -> int:
    from kvroute.budget import budget_report, parse_bytes
    from kvroute.plan import KVShape
    from kvroute.shapes import resolve_config

    shape = KVShape.from_config(resolve_config(args.model))
    owners, text = budget_report(shape, parse_bytes(args.memory), args.batch, args.context, args.dtype)
    print(text)
    return 0 if owners else 1


def _search(args: argparse.Namespace) -> int:
    from kvroute.config_cli import config_from_args
    from kvroute.search_run import SearchConfig, search_checkpoint

    run = search_checkpoint(config_from_args(SearchConfig, args), log=lambda line: print(line, file=sys.stderr))
    print(run.report())
    if args.out:
        run.save(args.out)
    return 0
