"""Seconds to score context-QA one prompt at a time against left-padded batches (`kvroute eval --qa-batch-size`).

Scores the demo's questions with one checkpoint under each plan given, as ``kvroute eval`` does
(greedy, 16 new tokens, the first line scored), once per batch size, the sizes alternating over
``--rounds`` rounds so that the machine's drift falls on all of them alike. Records the seconds,
F1 and how many answers differ from the one-at-a-time answers (none in float32; under bf16 autocast a
padded batch can round differently). Needs `make demo` (runs/demo). Not a test: its numbers go
into docs/RESULTS.md.

    .venv/bin/python benchmarks/qa_batch.py --json docs/bench/qa_batch_t2.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/demo/rcla-mix-text/final")
    parser.add_argument("--qa", default="runs/demo/data/fictional/test.jsonl")
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--plans", default="full,every:2")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import kvroute
    from kvroute.data.qa import read_qa
    from kvroute.evaluate import qa_score
    from kvroute.models import load, load_tokenizer
    from kvroute.precision import autocast, cpu_model, resolve_precision

    precision = resolve_precision(args.precision, "cpu")
    examples = read_qa([args.qa], args.questions, "--qa")
    model, tokenizer = load(args.checkpoint, plan="full"), load_tokenizer(args.checkpoint)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    results = {}
    for plan in args.plans.split(","):
        kvroute.set_plan(model, plan)
        seconds = {b: [] for b in sizes}
        answers, f1 = {}, {}
        for _ in range(args.rounds):
            for b in sizes:
                start = time.perf_counter()
                with autocast(precision, "cpu"):
                    metrics, predictions = qa_score(model, tokenizer, examples, max_new_tokens=16, batch_size=b)
                seconds[b].append(round(time.perf_counter() - start, 2))
                answers[b], f1[b] = [p["prediction"] for p in predictions], metrics["f1"]
        results[plan] = {str(b): {"seconds": seconds[b], "median_s": statistics.median(seconds[b]), "f1": f1[b],
                                  "answers_differing_from_batch_1": sum(a != c for a, c in zip(answers[b], answers[sizes[0]]))}
                         for b in sizes}
        line = ", ".join(f"batch {b}: {statistics.median(seconds[b]):.1f} s (F1 {f1[b]:.3f})" for b in sizes)
        print(f"{plan}: {line}", flush=True)
    record = {"checkpoint": args.checkpoint, "questions": len(examples), "cpu": cpu_model(), "threads": args.threads,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "precision": precision,
              "torch": torch.__version__, "args": vars(args), "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
