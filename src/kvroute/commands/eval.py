"""kvroute eval: quality of checkpoints under every sharing plan, with tables and Pareto plots."""

from __future__ import annotations

import argparse
import sys

NAME = "eval"
HELP = "Score checkpoints under sharing plans (LM loss, context-QA, multiple choice); tables, files, plots."


def configure(p: argparse.ArgumentParser) -> None:
    from kvroute.evaluate import DEFAULT_PLANS

    p.add_argument("checkpoints", nargs="*", help="hub ids, model folders or .gguf files")
    p.add_argument("--plans", default=DEFAULT_PLANS, help=f"comma-separated plan specs (default: {DEFAULT_PLANS})")
    p.add_argument("--text", action="append", default=[], metavar="PATH",
                   help="held-out text: a .txt file, a folder of them or a quoted glob (repeatable)")
    p.add_argument("--qa", action="append", default=[], metavar="JSONL",
                   help="context-QA JSONL {context, question, answer} (repeatable)")
    p.add_argument("--mc", action="append", default=[], metavar="FILE",
                   help="multiple choice JSONL {context, choices, answer} or BIG-bench task.json (repeatable)")
    p.add_argument("--out", default="eval", help="output folder (default: eval)")
    p.add_argument("--window", type=int, default=None,
                   help="LM sliding window, tokens (default: 1024, or the model's context if shorter)")
    p.add_argument("--stride", type=int, default=None, help="LM window stride, tokens (default: half the window)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens taken from each text dataset")
    p.add_argument("--limit", type=int, default=None, help="examples taken from each QA / choice dataset")
    p.add_argument("--max-new-tokens", type=int, default=32, help="QA answer length limit")
    p.add_argument("--chat", action="store_true", help="wrap QA prompts in the tokenizer's chat template")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--kv-dtype", default=None, help="dtype for the KV KiB/token figures (default: the model's)")
    p.add_argument("--kv-quant", default="none",
                   help="KV cache storage, comma-separated: none, int8, int4 (every plan runs under each; "
                        "quantized runs score through the cache)")
    p.add_argument("--no-plot", action="store_true", help="do not write pareto.png")
    p.add_argument("--compare", nargs="+", metavar="RESULTS", default=None,
                   help="merge these results.json files (or folders) instead of evaluating")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvroute.results import format_table, merge_results

    if args.compare:
        from kvroute.results import ResultWriter

        if args.checkpoints or args.text or args.qa or args.mc:
            raise ValueError("--compare merges result files; give no checkpoints or datasets with it")
        rows = merge_results(args.compare)
        writer = ResultWriter(args.out, run={"compare": list(args.compare)})
        writer.rows = rows
        writer.flush()
        errors = 0
    else:
        from kvroute.evaluate import EvalConfig, evaluate

        config = EvalConfig(
            checkpoints=args.checkpoints, plans=args.plans, text=args.text, qa=args.qa, mc=args.mc,
            out=args.out, window=args.window, stride=args.stride, max_tokens=args.max_tokens,
            limit=args.limit, max_new_tokens=args.max_new_tokens, chat=args.chat, dtype=args.dtype,
            device=args.device, kv_dtype=args.kv_dtype, kv_quant=args.kv_quant,
        )
        writer = evaluate(config)
        rows, errors = writer.rows, len(writer.errors)
    print(format_table(rows))
    written = [writer.json_path, writer.csv_path]
    if not args.no_plot and rows:
        from kvroute.plots import pareto_plot

        try:
            written.append(pareto_plot(rows, Path(args.out) / "pareto.png"))
        except ImportError as err:
            print(f"kvroute eval: no plot: {err}", file=sys.stderr)
    print("wrote " + ", ".join(map(str, written)))
    if errors:
        for e in writer.errors:
            print(f"kvroute eval: plan {e['plan']} of {e['checkpoint']} failed: {e['error']}", file=sys.stderr)
        return 1
    return 0
