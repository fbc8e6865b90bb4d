"""Per-plan calibration variants on SmolLM2-135M, scored on held-out text (issue 15, item 2).

Calibration text: State of the Union 1990-2006. Held-out: State of the Union 2007-2021
(same domain, later years) and Moby Dick (another domain). Neither held-out set is used to
fit or to choose anything; the ridge and the refinement are chosen on chunks held out
from the calibration text itself.

Each run loads a checkpoint, calibrates one plan with one variant through the public API
(``kvroute.calibrate``) and records held-out perplexity under that plan, plus the plain
(uncalibrated) and full-cache perplexities. Results are appended to
experiments/results/calibration.json as they finish (a rerun skips finished runs).

    .venv/bin/python experiments/calibration.py                                 # every run, as measured
    .venv/bin/python experiments/calibration.py --checkpoints base --plans every:2 --variants closed
    .venv/bin/python experiments/calibration.py --table                          # print the table only

Variants (``--variants``):
    value      value maps only (per query head), closed form
    group      value maps per KV head, no query map
    closed     value + query maps, closed form (the default of ``kvroute calibrate``)
    refine     closed + end-to-end refinement (``--steps`` steps)
    tokensN    closed form on N calibration tokens (token-count sensitivity)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import kvroute  # noqa: E402
from kvroute.calibrate import CalibrationConfig, calibration_data, mean_loss  # noqa: E402
from kvroute.models import load_tokenizer  # noqa: E402
from common import sotu  # noqa: E402
from former_demo import former_demo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MOBY = ROOT / "assets" / "text" / "moby" / "data"
RESULTS = ROOT / "experiments" / "results" / "calibration.json"
#: the untrained model and the former demo's fine-tunes (experiments/former_demo.py)
CHECKPOINTS = {"base": lambda: ROOT / "assets" / "smollm2-135m", "standard": lambda: former_demo("standard"),
               "rcla": lambda: former_demo("rcla")}
EVAL_TOKENS = 8192


def variant_config(name: str, steps: int) -> CalibrationConfig:
    if name == "value":
        return CalibrationConfig(query=False)
    if name == "group":
        return CalibrationConfig(query=False, value_maps="group")
    if name == "closed":
        return CalibrationConfig()
    if name == "refine":
        return CalibrationConfig(steps=steps)
    if name.startswith("tokens"):
        return CalibrationConfig(tokens=int(name[6:]))
    raise ValueError(f"unknown variant {name!r}")


def ppl(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", default="base,rcla,standard")
    parser.add_argument("--plans", default="every:2,every:4")
    parser.add_argument("--variants", default="value,closed,refine")
    parser.add_argument("--steps", type=int, default=60, help="refinement steps of the refine variant")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table", action="store_true", help="print the results table and exit")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    done = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": {}}
    if args.table:
        print(table(done["runs"]))
        return
    calib_files, held = sotu(1990, 2006), {"sotu_2007plus": sotu(2007, 2100), "moby": [str(MOBY)]}
    for ckpt in args.checkpoints.split(","):
        path = CHECKPOINTS[ckpt]()
        tok = load_tokenizer(path)
        held_chunks = {k: calibration_data(tok, v, EVAL_TOKENS, 256) for k, v in held.items()}
        for plan in args.plans.split(","):
            for variant in args.variants.split(","):
                key = f"{ckpt}/{plan}/{variant}" + (f"/{args.steps}" if variant == "refine" else "")
                if key in done["runs"]:
                    continue
                model = kvroute.load(path)
                scores = {}
                for name, chunks in held_chunks.items():
                    kvroute.set_plan(model, "full")
                    full = mean_loss(model, chunks)
                    kvroute.set_plan(model, plan)
                    scores[name] = {"full": full, "plain": mean_loss(model, chunks)}
                config = variant_config(variant, args.steps)
                start = time.perf_counter()
                fit = kvroute.calibrate(model, plan, calib_files, config, tokenizer=tok)[0]
                seconds = time.perf_counter() - start
                kvroute.set_plan(model, plan)
                for name, chunks in held_chunks.items():
                    scores[name]["calibrated"] = mean_loss(model, chunks)
                done["runs"][key] = {
                    "checkpoint": ckpt, "plan": plan, "variant": variant, "config": config.__dict__,
                    "heldout": scores, "calibration_val_loss": fit.loss, "refined": fit.refined,
                    "seconds": round(seconds, 1), "threads": args.threads,
                }
                done["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                                   "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                RESULTS.write_text(json.dumps(done, indent=1))
                s = scores["sotu_2007plus"]
                print(f"{key}: SOTU ppl full {ppl(s['full']):.1f} plain {ppl(s['plain']):,.1f} -> "
                      f"{ppl(s['calibrated']):,.1f} ({seconds:.0f} s)", flush=True)
    print(table(done["runs"]))


def table(runs: dict) -> str:
    head = ("| checkpoint | plan | variant | SOTU full | SOTU plain | SOTU calibrated (x full) "
            "| Moby full | Moby plain | Moby calibrated (x full) | fit s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs.values():
        s, m = r["heldout"]["sotu_2007plus"], r["heldout"]["moby"]
        variant = r["variant"] + (f" ({r['config']['steps']} steps{', kept' if r['refined'] else ', not kept'})"
                                  if r["variant"] == "refine" else "")
        lines.append(
            f"| {r['checkpoint']} | {r['plan']} | {variant} | {ppl(s['full']):.1f} | {ppl(s['plain']):,.0f} "
            f"| **{ppl(s['calibrated']):,.1f}** ({ppl(s['calibrated']) / ppl(s['full']):.1f}x) "
            f"| {ppl(m['full']):.1f} | {ppl(m['plain']):,.0f} "
            f"| {ppl(m['calibrated']):,.1f} ({ppl(m['calibrated']) / ppl(m['full']):.1f}x) | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
