"""kvroute plan: show a plan's memory, turn a memory budget into owner layers, search the best plan."""

from __future__ import annotations

import argparse
import sys

NAME = "plan"
HELP = "Show a sharing plan's KV memory, size a memory budget, or search the best plan for a budget."


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="plan_command", metavar="ACTION", required=True)
    model_help = "named shape (smollm2-135m, qwen3-8b, qwen3-8b-mini, llama-3.1-8b), checkpoint folder or .gguf"

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

    search = sub.add_parser("search", help="the owner set that minimizes loss on calibration text")
    search.add_argument("model", help="checkpoint folder, hub id or .gguf (weights and tokenizer are loaded)")
    search.add_argument("--budget", required=True,
                        help="fraction of layers (0.25), number of owner layers (8) or memory (6GiB, with --context)")
    search.add_argument("--data", nargs="+", required=True, help="calibration text files or folders (.txt, .md, .jsonl)")
    search.add_argument("--chunk-tokens", type=int, default=256, help="tokens per calibration chunk (default 256)")
    search.add_argument("--max-chunks", type=int, default=8, help="chunks read in total (default 8)")
    search.add_argument("--heldout", type=float, default=0.5,
                        help="fraction of the chunks (the last ones) held out for the comparison (default 0.5)")
    search.add_argument("--beam", type=int, default=1, help="owner sets kept per greedy step (default 1)")
    search.add_argument("--shortlist", type=int,
                        help="lazy greedy: after the first step, try only the N layers that did best in the "
                             "previous step (default: try all)")
    search.add_argument("--refine", type=int, default=20,
                        help="rounds of moving single owners to neighbouring layers (default 20, 0: none)")
    search.add_argument("--batch-size", type=int, default=8, help="chunks per forward pass")
    search.add_argument("--model-dtype", default="float32", help="dtype the model runs in (default float32)")
    search.add_argument("--out", help="write the result (plan, table) as JSON here")
    _memory_args(search, batch=1, context=None)
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
    from kvroute.search import search_checkpoint

    run = search_checkpoint(
        args.model, args.budget, args.data, chunk_tokens=args.chunk_tokens, max_chunks=args.max_chunks,
        heldout=args.heldout, beam=args.beam, shortlist=args.shortlist, refine=args.refine,
        batch_size=args.batch_size, model_dtype=args.model_dtype, batch=args.batch, context=args.context,
        kv_dtype=args.dtype, log=lambda line: print(line, file=sys.stderr),
    )
    print(run.report())
    if args.out:
        run.save(args.out)
    return 0
