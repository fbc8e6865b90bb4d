"""How many calibration tokens are enough? (issue 15, item 2)

Calibrates one checkpoint for one plan (closed form, the product's defaults otherwise) on
State of the Union 1990-2006 with a growing number of tokens, and scores held-out SOTU
2007-2021 and Moby Dick (4,096 tokens each, 256-token chunks) under the calibrated plan.
Appends fit seconds and perplexities to experiments/results/calibration_tokens.json.

    .venv/bin/python experiments/calibration_tokens.py --plan every:2 --tokens 1024,2048,4096,8192
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
from kvroute.calibrate import CalibrationConfig, calibrate, calibration_data, mean_loss, remove_calibration  # noqa: E402
from kvroute.models import load_tokenizer  # noqa: E402
from common import append_rows, sotu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MOBY = ROOT / "assets" / "text" / "moby" / "data"
RESULTS = ROOT / "experiments" / "results" / "calibration_tokens.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "assets" / "smollm2-135m"))
    parser.add_argument("--plan", default="every:2")
    parser.add_argument("--tokens", default="1024,2048,4096,8192")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.checkpoint)
    model = kvroute.load(args.checkpoint)
    held = {"sotu_2007plus": calibration_data(tok, sotu(2007, 2100), 4096, 256),
            "moby": calibration_data(tok, [str(MOBY)], 4096, 256)}
    kvroute.set_plan(model, "full")
    rows = []
    full = {k: math.exp(mean_loss(model, v)) for k, v in held.items()}
    for tokens in (int(t) for t in args.tokens.split(",")):
        remove_calibration(model)
        start = time.perf_counter()
        calibrate(model, args.plan, sotu(1990, 2006), CalibrationConfig(tokens=tokens), tokenizer=tok, progress=False)
        seconds = time.perf_counter() - start
        kvroute.set_plan(model, args.plan)
        ppl = {k: math.exp(mean_loss(model, v)) for k, v in held.items()}
        row = {"checkpoint": args.checkpoint, "plan": args.plan, "tokens": tokens, "fit_seconds": round(seconds, 1),
               "threads": args.threads, "ppl": ppl, "ppl_full": full}
        print(json.dumps(row), flush=True)
        rows.append(row)
    append_rows(RESULTS, rows)


if __name__ == "__main__":
    main()
