"""The demo's text stage at half the steps, with two rollouts per row: as good for less time? (issue 15)

The demo's text stage (``scripts/demo.py``, ``TEXT_STAGE``) trains 80 steps of 2 rows, each row
prompting one greedy rollout under the plan its pass draws. Greedy decoding of the 135M model is
bound by reading its weights, so 4 rollouts a step cost little more than 2, and the stage is the
longest link of the demo's R-CLA chain after the mix (8.1-10.2 min at one thread). This trains, from
the demo's mix (``runs/demo/rcla-mix/final``, seed 0), variants of the stage on three text-stage seeds:

- ``demo``: the demo's stage (80 steps, one rollout per row); seed 0 is the demo's own checkpoint;
- ``x2``: 40 steps, two rollouts per row (``--seq-ul-per-row 2``): the same rollouts, half the updates;
- ``x2lr2``: the same at twice the learning rate (2e-4), for the halved number of updates (seeds 0 and 1).

Each run is scored on what none of the recipe's choices were made on: perplexity on the demo's
4,096 held-out SOTU 2007-2021 tokens (bf16, as the demo scores), context QA on 64 fresh fictional
questions (test records 32-95, bf16, ``qa_wide.py``'s scoring), and distinct-2 of 64 greedy tokens
after 75 fresh held-out prompts (fp32, ``qa_wide.py --text``), under full, every:2 and every:4 with the
model's pairwise maps. One thread per run, two runs side by side:

    make demo     # or at least its pair fit and mix
    .venv/bin/python experiments/text_stage_budget.py --jobs 2

Writes runs/text_stage_budget/NAME and experiments/results/text_stage_budget.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import common as c  # noqa: E402  (puts scripts/ on sys.path)
import demo  # noqa: E402  (scripts/demo.py: the recipe and its data split)
from demo_batch import text_stage  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "runs" / "demo"
RUNS_DIR = ROOT / "runs" / "text_stage_budget"
RESULTS = c.RESULTS / "text_stage_budget.json"
PLANS = "full,every:2,every:4"
QUESTIONS = (32, 64)  # fresh test records 32-95

VARIANTS = {
    "demo": dict(steps=80),
    "x2": dict(steps=40, seq_ul_per_row=2),
    "x2lr2": dict(steps=40, seq_ul_per_row=2, lr=2e-4),
}
#: x2lr2 ran first, on two seeds: its full cache lost 2.4 and 4.6 points of perplexity against the demo's stage
#: on the same seed, and on seed 0 its full-cache QA fell to F1 0.58, so it went no further
NAMES = ["x2lr2-s0", "x2lr2-s1", *(f"{v}-s{s}" for s in (0, 1, 2) for v in ("x2", "demo"))]


def checkpoint(name: str) -> Path:
    if name == "demo-s0":  # the demo's own text stage (seed 0)
        return DEMO / "rcla-mix-text" / "final"
    return RUNS_DIR / name / "final"


def run_one(name: str) -> dict:
    """Train ``name`` (unless finished) and score it; every part is cached in the run's folder."""
    variant, seed = name.rsplit("-s", 1)
    recipe = dict(VARIANTS[variant])
    steps = recipe.pop("steps")
    out, ckpt = RUNS_DIR / name, checkpoint(name)
    out.mkdir(parents=True, exist_ok=True)
    seconds = None
    if not (ckpt / "config.json").is_file():
        start = DEMO / "rcla-mix" / "final"
        if not (start / "config.json").is_file():
            sys.exit(f"text_stage_budget: {start} is missing; run `make demo` first")
        calib = demo.calibration_text(demo.split_sotu()[0])
        began = time.perf_counter()
        text_stage(start, calib, out, steps, demo.BATCH, seed=int(seed), **recipe)
        seconds = round(time.perf_counter() - began, 1)
        (out / "train_seconds.json").write_text(json.dumps({"seconds": seconds}))
    elif (out / "train_seconds.json").is_file():
        seconds = json.loads((out / "train_seconds.json").read_text())["seconds"]
    scored = out / "scores.json"
    if scored.is_file():
        return json.loads(scored.read_text())
    return score(name, ckpt, seconds, scored)


def score(name: str, ckpt: Path, seconds: float | None, target: Path) -> dict:
    import torch

    import qa_wide
    from kvroute.evaluate import EvalConfig, evaluate
    from kvroute.precision import resolve_precision

    held = DEMO / "data" / "sotu-2007-2021"
    writer = evaluate(EvalConfig(checkpoints=[str(ckpt)], plans=PLANS, out=str(RUNS_DIR / name / "ppl"), text=[str(held)],
                                 window=256, stride=256, max_tokens=demo.EVAL_TOKENS,
                                 precision=resolve_precision("auto", "cpu")), progress=False)
    ppl = {r["plan"]: r["value"] for r in writer.rows if r["metric"] == "perplexity"}
    qa = {r["plan"]: r for r in qa_wide.score(f"budget-{name}", str(ckpt.relative_to(ROOT)),
                                              qa_wide.questions(*QUESTIONS), PLANS, precision="bf16")}
    text = {r["plan"]: r for r in qa_wide.score_text(f"budget-{name}", str(ckpt.relative_to(ROOT)), PLANS)}
    result = {"run": name, "checkpoint": str(ckpt.relative_to(ROOT)), "train_seconds": seconds,
              "threads": torch.get_num_threads(), "perplexity": ppl,
              "qa_f1": {p: r["f1"] for p, r in qa.items()},
              "qa_f1_vs_full": {p: r["f1_vs_full"] for p, r in qa.items()},
              "qa_f1_vs_full_95": {p: r["f1_vs_full_95"] for p, r in qa.items()},
              "distinct2": {p: r["distinct2_mean"] for p, r in text.items()},
              "distinct2_95": {p: r["distinct2_mean_95"] for p, r in text.items()},
              "share_distinct2_at_least_0.5": {p: r["share_at_least_0.5"] for p, r in text.items()},
              "questions": QUESTIONS[1], "prompts": len(next(iter(text.values()))["distinct2"])}
    target.write_text(json.dumps(result, indent=1) + "\n")
    return result


def collect(results: dict[str, dict]) -> None:
    cached = {n: json.loads((RUNS_DIR / n / "scores.json").read_text()) for n in NAMES
              if (RUNS_DIR / n / "scores.json").is_file()}  # runs scored by an earlier invocation
    results = {n: {**cached, **results}[n] for n in NAMES if n in {**cached, **results}}
    c.write_json(RESULTS, {"machine": c.machine(), "variants": VARIANTS, "runs": results})
    print("| run | train min | full ppl / F1 / d2 | every:2 ppl (x full) / F1 (x full) / d2 | every:4 ppl (x full) / d2 |")
    for name, r in results.items():
        p, f, d = r["perplexity"], r["qa_f1"], r["distinct2"]
        minutes = f"{r['train_seconds'] / 60:.1f}" if r["train_seconds"] else "-"
        print(f"| {name} | {minutes} | {p['full']:.2f} / {f['full']:.2f} / {d['full']:.2f} | "
              f"{p['every:2']:.1f} ({p['every:2'] / p['full']:.2f}x) / {f['every:2']:.2f} "
              f"({r['qa_f1_vs_full']['every:2']:.2f}x) / {d['every:2']:.2f} | "
              f"{p['every:4']:.1f} ({p['every:4'] / p['full']:.2f}x) / {d['every:4']:.2f} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    c.run_experiment(__file__, NAMES, run_one, collect, argv, setup=None, runs_dir=RUNS_DIR)


if __name__ == "__main__":
    main()
