"""kvroute eval: quality of checkpoints under every sharing plan, with tables and Pareto plots."""

from __future__ import annotations

import argparse
import sys

NAME = "eval"
#: dests that are not EvalConfig fields
CLI_ONLY = ("config", "no_plot", "compare")
HELP = ("Score checkpoints under sharing plans (LM loss, context-QA, multiple choice, distinct-2 of greedy "
        "continuations); tables, files, plots.")


def configure(p: argparse.ArgumentParser) -> None:
    from kvroute.config_cli import add_config_flags
    from kvroute.evaluate import EvalConfig

    p.add_argument("checkpoints", nargs="*", default=argparse.SUPPRESS, help="hub ids, model folders or .gguf files")
    repeatable = {"action": "append", "nargs": None}  # --text A --text B
    add_config_flags(
        p, EvalConfig, skip={"checkpoints"},
        text={**repeatable, "metavar": "PATH", "help": "held-out text: a .txt file, a folder of them or a quoted "
                                                         "glob (repeatable)"},
        qa={**repeatable, "metavar": "JSONL", "help": "context-QA JSONL {context, question, answer} (repeatable)"},
        mc={**repeatable, "metavar": "FILE",
            "help": "multiple choice JSONL {context, choices, answer} or BIG-bench task.json (repeatable)"},
        continuations={**repeatable, "metavar": "PATH",
                       "help": "held-out text whose sentence starts are continued greedily and scored by "
                               "distinct-2 (repeatable)"},
        dtype={"choices": ["float32", "bfloat16", "float16"]},
    )
    p.add_argument("--no-plot", action="store_true", help="do not write pareto.png")
    p.add_argument("--compare", nargs="+", metavar="RESULTS", default=None,
                   help="merge these results.json files (or folders) instead of evaluating")


def config(args: argparse.Namespace):
    """The validated :class:`~kvroute.evaluate.EvalConfig` these arguments ask for (None with ``--compare``)."""
    from kvroute.config_cli import config_values
    from kvroute.evaluate import EvalConfig

    values = config_values(EvalConfig, args)
    if args.compare:
        if any(values.get(name) for name in ("checkpoints", "text", "qa", "mc", "continuations")):
            raise ValueError("--compare merges result files; give no checkpoints or datasets with it")
        return None
    return EvalConfig(**{"checkpoints": [], **values})


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvroute.config_cli import config_values
    from kvroute.evaluate import EvalConfig
    from kvroute.results import compare_results, format_table

    settings = config(args)
    if settings is None:
        out = config_values(EvalConfig, args).get("out", EvalConfig.out)
        writer = compare_results(args.compare, out)
        rows, errors = writer.rows, 0
    else:
        from kvroute.evaluate import evaluate

        out = settings.out
        writer = evaluate(settings)
        rows, errors = writer.rows, len(writer.errors)
    print(format_table(rows))
    written = [writer.json_path, writer.csv_path]
    if not args.no_plot and rows:
        from kvroute.plots import pareto_plot

        try:
            written.append(pareto_plot(rows, Path(out) / "pareto.png"))
        except ImportError as err:
            print(f"kvroute eval: no plot: {err}", file=sys.stderr)
    print("wrote " + ", ".join(map(str, written)))
    if errors:
        for e in writer.errors:
            print(f"kvroute eval: plan {e['plan']} of {e['checkpoint']} failed: {e['error']}", file=sys.stderr)
        return 1
    return 0
