"""Score hand-made reference plans on the exact chunks `kvroute plan search` used (docs/plan_search_results.md).

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=2 .venv/bin/python experiments/plan_search_reference.py
"""

from __future__ import annotations

import json
import math

import kvroute
from common import sotu
from kvroute.data.text import read_texts
from kvroute.search import PlanScorer, calibration_chunks

MODEL = "assets/smollm2-135m"
FILES = sotu(2007, 2021)
PLANS = {
    "every:4": "every:4",
    "lastquarter (0 + layers 23-29)": "layers:0," + ",".join(map(str, range(23, 30))),
    "searched 25%": json.load(open("docs/plan_search/smollm2_untrained_0.25.json"))["plan"]["spec"],
    "every:2": "every:2",
    "lasthalf (0 + layers 15-29, issue 8)": "layers:0," + ",".join(map(str, range(15, 30))),
    "searched 50%": json.load(open("docs/plan_search/smollm2_untrained_0.5.json"))["plan"]["spec"],
    "full": "full",
}

model = kvroute.load(MODEL)
chunks = calibration_chunks(kvroute.load_tokenizer(MODEL), read_texts(FILES), 256, 4)  # as the CLI run
search, heldout = PlanScorer(model, chunks[:2]), PlanScorer(model, chunks[2:])
print("| plan | owners | search loss | search ppl | held-out loss | held-out ppl |\n|---|---|---|---|---|---|")
for name, spec in PLANS.items():
    plan = kvroute.SharingPlan.for_model(spec, model.config)
    s, h = search.loss(plan.owners), heldout.loss(plan.owners)
    print(f"| {name} | {len(plan.owners)} | {s:.4f} | {math.exp(s):,.1f} | {h:.4f} | {math.exp(h):,.1f} |")
