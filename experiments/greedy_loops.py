"""How often greedy text loops under each plan, over many prompts rather than the demo's one (issue 15).

The demo reports distinct-2 of one 64-token greedy continuation per model and plan, which is a
noisy measure of degeneration. This takes ``--prompts`` prompts from held-out State of the Union
2007-2021 (the first ``--prompt-words`` words of a sentence near the middle of each speech), or with
``--domain moby`` from Moby Dick chapters spread over the book (text no demo model trains on),
generates 64 greedy tokens from each under the given model and plan pairs (``--pairs``, or any
checkpoint under ``--plans`` with ``--checkpoint``), and reports the mean distinct-2 and the share of
continuations with distinct-2 >= 0.5 (issue 15's bar for "not degenerate"). Appends to
experiments/results/greedy_loops.json.

    make demo
    .venv/bin/python experiments/greedy_loops.py --demo runs/demo
    .venv/bin/python experiments/greedy_loops.py --checkpoint runs/demo/rcla-mix-text/final --plans full,every:2,every:4 --domain moby
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from kvroute.generate import generate  # noqa: E402
from kvroute.models import load, load_tokenizer  # noqa: E402
from kvroute.plan import parse_plan_list  # noqa: E402
from common import append_rows, moby_chapters, sotu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "greedy_loops.json"
#: name -> (checkpoint folder under the demo folder, or a path relative to the repository, plan)
PAIRS = {
    "base full": ("../../assets/smollm2-135m", "full"),
    "base+cal every:2": ("base-cal", "every:2"),
    "base+cal every:4": ("base-cal", "every:4"),
    "rcla+cal every:2": ("../demo-former/rcla-cal", "every:2"),  # experiments/former_demo.py
    "rcla+cal every:4": ("../demo-former/rcla-cal", "every:4"),
    "every2-qa every:2": ("../one_plan_demo/steps120/final", "every:2"),  # the former demo's one-plan model
    "one plan every:4 (120 steps)": ("../one_plan_demo/every4-steps120/final", "every:4"),
    "one plan every:2 (120 steps; seed 1)": ("../one_plan_demo/steps120-seed1/final", "every:2"),
    "plan:every:2+every:4 model every:2": ("../one_plan_demo/plans2-steps120/final", "every:2"),
    "plan:every:2+every:4 model every:4": ("../one_plan_demo/plans2-steps120/final", "every:4"),
    "plan:every:2+every:4 model full": ("../one_plan_demo/plans2-steps120/final", "full"),
    "plan:every:2+every:4 + unlikelihood every:2": ("../one_plan_demo/plans2-steps120-ul1/final", "every:2"),
    "plan:every:2+every:4 + unlikelihood every:4": ("../one_plan_demo/plans2-steps120-ul1/final", "every:4"),
    "plan:every:2+every:4 + unlikelihood full": ("../one_plan_demo/plans2-steps120-ul1/final", "full"),
}


def prompts(count: int, words: int, domain: str = "sotu") -> list[str]:
    """The first ``words`` words of a sentence near the middle of ``count`` held-out texts, spread over them.

    ``domain``: ``sotu``, the speeches of 2007-2021; ``moby``, the chapters of Moby Dick in order.
    """
    if domain == "sotu":
        files = sotu(2007, 2021)
    elif domain == "moby":
        files = moby_chapters()
    else:
        raise ValueError(f"unknown domain {domain!r}: sotu or moby")
    if not files:
        raise FileNotFoundError(f"no {domain} text under assets/text: run scripts/fetch_assets.py")
    out = []
    for path in [files[i * len(files) // count] for i in range(min(count, len(files)))]:
        text = " ".join(Path(path).read_text(encoding="utf-8").split())
        starts = [m.end() for m in re.finditer(r"[.!?] (?=[A-Z])", text)]
        start = min(starts, key=lambda i: abs(i - len(text) // 2))
        out.append(" ".join(text[start:].split()[:words]))
    return out


def greedy_scores(model, tokenizer, texts: list[str]) -> tuple[dict, list]:
    """64 greedy tokens after each prompt under the model's plan: the distinct-2 summary, and the samples."""
    samples = [generate(model, tokenizer, text, max_new_tokens=64) for text in texts]
    scores = [s.distinct2 for s in samples]
    return {"distinct2_mean": round(statistics.mean(scores), 3),
            "share_at_least_0.5": round(sum(d >= 0.5 for d in scores) / len(scores), 3),
            "distinct2": [round(d, 3) for d in scores]}, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default=str(ROOT / "runs" / "demo"), help="a finished `make demo` folder")
    parser.add_argument("--pairs", default=",".join(PAIRS), help="comma-separated names of PAIRS")
    parser.add_argument("--checkpoint", help="score this checkpoint under --plans instead of --pairs")
    parser.add_argument("--plans", default="full,every:2,every:4", help="with --checkpoint: the plans")
    parser.add_argument("--domain", choices=["sotu", "moby"], default="sotu", help="where the prompts come from")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-words", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts = prompts(args.prompts, args.prompt_words, args.domain)
    if args.checkpoint:
        if not (Path(args.checkpoint) / "config.json").is_file():
            parser.error(f"--checkpoint {args.checkpoint}: no config.json there (a checkpoint folder, e.g. RUN/final)")
        runs = {f"{args.checkpoint} {plan}": (Path(args.checkpoint).resolve(), plan) for plan in parse_plan_list(args.plans)}
    else:
        runs = {name: ((Path(args.demo) / PAIRS[name][0]).resolve(), PAIRS[name][1]) for name in args.pairs.split(",")}
    rows = []
    for name, (source, plan) in runs.items():
        if not (source / "config.json").is_file():
            print(f"{name}: {source} not found, skipped", flush=True)
            continue
        start = time.perf_counter()
        model, tokenizer = load(source, plan=plan), load_tokenizer(source)
        summary, samples = greedy_scores(model, tokenizer, texts)
        row = {"pair": name, "checkpoint": str(source.relative_to(ROOT)) if source.is_relative_to(ROOT) else str(source),
               "plan": plan, "domain": args.domain, "prompts": len(texts), **summary,
               "seconds": round(time.perf_counter() - start, 1), "threads": args.threads,
               "first_sample": texts[0] + samples[0].text}
        print(json.dumps({k: v for k, v in row.items() if k != "first_sample"}), flush=True)
        rows.append(row)
        del model
    append_rows(RESULTS, rows)


if __name__ == "__main__":
    main()
