"""One model for one plan: calibrate, then fine-tune for that plan only (issue 15, item 4).

Starts from a calibrated checkpoint (``make demo`` writes runs/demo/base-cal: the untrained
SmolLM2 with every:2 and every:4 calibrations), fine-tunes it with ``--routing plan:PLAN``
(the calibration maps stay fixed and act on every step; the weights learn around them) on
State of the Union 1790-2006, then scores held-out State of the Union 2007-2021 and Moby Dick
(8,192 tokens each, 256-token chunks) under the plan, against the untrained model's full cache.
Appends to experiments/results/one_plan.json.

    .venv/bin/python experiments/one_plan.py --plan every:2
    .venv/bin/python experiments/one_plan.py --plan every:4 --start assets/smollm2-135m   # no calibration
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import kvroute  # noqa: E402
from kvroute.calibrate import calibration_data, is_calibrated, mean_loss  # noqa: E402
from kvroute.models import load_tokenizer  # noqa: E402
from common import sotu  # noqa: E402
from kvroute.train import TrainConfig, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MOBY = ROOT / "assets" / "text" / "moby" / "data"
BASE = ROOT / "assets" / "smollm2-135m"
RESULTS = ROOT / "experiments" / "results" / "one_plan.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", default="every:2")
    parser.add_argument("--start", default=str(ROOT / "runs" / "demo" / "base-cal"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--distill", type=float, default=0.0,
                        help="weight of distillation from the frozen starting model under the full cache")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    name = f"{Path(args.start).name}/{args.plan}/{args.steps}/{args.lr:g}/{args.precision}" + (
        f"/distill{args.distill:g}" if args.distill else "")
    out = ROOT / "runs" / "one_plan" / name.replace("/", "_").replace(":", "")
    start = time.perf_counter()
    result = train(TrainConfig(
        model=args.start, data=sotu(1790, 2006), output_dir=str(out), seq_len=256, batch_size=4,
        max_steps=args.steps, lr=args.lr, warmup=0.05, schedule="cosine", seed=0, device="cpu", eval_every=0,
        save_every=args.steps, routing=f"plan:{args.plan}", precision=args.precision, quiet=True,
        distill=args.distill, distill_from="base",
    ))
    minutes = (time.perf_counter() - start) / 60
    tok = load_tokenizer(BASE)
    held = {"sotu_2007plus": calibration_data(tok, sotu(2007, 2100), 8192, 256),
            "moby": calibration_data(tok, [str(MOBY)], 8192, 256)}
    base = kvroute.load(BASE)
    tuned = kvroute.load(result.final_checkpoint)
    scores = {}
    for data, chunks in held.items():
        kvroute.set_plan(base, "full")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kvroute.set_plan(tuned, args.plan)
        scores[data] = {"base_full": mean_loss(base, chunks), "tuned_plan": mean_loss(tuned, chunks)}
    row = {"start": args.start, "plan": args.plan, "steps": args.steps, "lr": args.lr, "precision": args.precision,
           "distill": args.distill,
           "calibrated": is_calibrated(tuned, args.plan), "train_minutes": round(minutes, 1),
           "threads": args.threads, "heldout": scores, "checkpoint": str(result.final_checkpoint)}
    done = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    done[name] = row
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(done, indent=1))
    for data, s in scores.items():
        ratio = math.exp(s["tuned_plan"] - s["base_full"])
        print(f"{name} {data}: untrained full {math.exp(s['base_full']):.1f}, tuned under {args.plan} "
              f"{math.exp(s['tuned_plan']):.1f} ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
