"""The demo's one-plan fine-tune with one knob changed (issue 15: is 1.5x within its budget?).

Starts from the demo's calibrated untrained model (runs/demo/base-cal), fine-tunes it exactly as
``make demo`` does for every:2 (``--routing plan:every:2``, 60 steps of 4 x 256 tokens, SOTU
1990-2006 mixed with the demo's 2,000 fictional QA records, distilling the start's full cache:
logits and hidden states, weight 1 each, lr 4e-4), except for the fields a variant overrides (the
every4 variants target every:4 instead). Scores held-out SOTU 2007-2021 (4,096 tokens, 256-token
windows) and the demo's 16 fictional QA questions under the plan, as the demo does, and the greedy
64-token continuation of the demo's prompt (distinct-2); a variant for several plans
(``plan:every:2+every:4``) is scored under each of them and under full, one row per plan. Appends
to experiments/results/one_plan_demo.json.

    make demo                                                   # runs/demo/base-cal and runs/demo/data
    .venv/bin/python experiments/one_plan_demo.py --variants lr1e-3,lr2e-3,lr2e-4,distill2,steps120
    .venv/bin/python experiments/one_plan_demo.py --demo runs/demo --variants steps120,every4-steps120
    .venv/bin/python experiments/one_plan_demo.py --variants steps120-seed1,plans2-steps120 --threads 1
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from kvroute.evaluate import EvalConfig, evaluate  # noqa: E402
from kvroute.generate import generate  # noqa: E402
from kvroute.hf.patch import PlanMismatchWarning  # noqa: E402
from kvroute.models import load, load_tokenizer  # noqa: E402
from kvroute.train import TrainConfig, train  # noqa: E402
from common import append_rows, sotu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "one_plan_demo.json"

#: name -> TrainConfig fields that differ from the demo's one-plan fine-tune
VARIANTS = {
    "demo": {},
    "lr1e-3": dict(lr=1e-3),
    "lr2e-3": dict(lr=2e-3),
    "lr2e-4": dict(lr=2e-4),
    "distill2": dict(distill=2.0, distill_hidden=2.0),
    "steps120": dict(max_steps=120, save_every=120),
    "every4": dict(routing="plan:every:4"),
    "every4-steps120": dict(routing="plan:every:4", max_steps=120, save_every=120),
    "steps120-seed1": dict(max_steps=120, save_every=120, seed=1),
    # one model for two plans: each pass draws every:2 or every:4, each with its own calibration's maps
    "plans2-steps120": dict(routing="plan:every:2+every:4", max_steps=120, save_every=120),
    "plans2-steps120-ul1": dict(routing="plan:every:2+every:4", max_steps=120, save_every=120, unlikelihood=1.0),
}
PROMPT = "In his address to Congress, the President said that"  # the demo's generation prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default=str(ROOT / "runs" / "demo"), help="a finished `make demo` folder")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    demo = Path(args.demo)
    rows = []
    for name in args.variants.split(","):
        out = ROOT / "runs" / "one_plan_demo" / name
        fields = dict(model=str(demo / "base-cal"), data=sotu(1990, 2006) + [str(demo / "data/fictional/train.jsonl")],
                      output_dir=str(out), seq_len=256, batch_size=4, max_steps=60, lr=4e-4, warmup=0.05,
                      schedule="cosine", seed=0, device="cpu", eval_every=0, save_every=60, routing="plan:every:2",
                      distill=1.0, distill_hidden=1.0, distill_from="base", quiet=True)
        fields.update(VARIANTS[name])
        plans = fields["routing"].removeprefix("plan:").split("+")
        scored = plans if len(plans) == 1 else ["full", *plans]  # a model for several plans: full, off them, too
        start = time.perf_counter()
        final = out / "final"
        if not (final / "config.json").is_file():  # a finished variant is scored again, not retrained
            final = train(TrainConfig(**fields)).final_checkpoint
        with warnings.catch_warnings():  # full is asked for
            warnings.simplefilter("ignore", PlanMismatchWarning)
            writer = evaluate(EvalConfig(checkpoints=[str(final)], plans=",".join(scored), out=str(out / "eval"),
                                         text=[str(demo / "data/sotu-2007-2021")], window=256, stride=256,
                                         max_tokens=4096, qa=[str(demo / "data/fictional/test.jsonl")], limit=16,
                                         max_new_tokens=16), progress=False)
            for plan in scored:
                scores = {r["metric"]: round(r["value"], 4) for r in writer.rows
                          if r["plan"] == plan and r["metric"] in ("perplexity", "f1", "exact_match")}
                model = load(final, plan=plan)
                sample = generate(model, load_tokenizer(final), PROMPT, max_new_tokens=64)
                row = {"variant": name, "overrides": VARIANTS[name], "seconds": round(time.perf_counter() - start, 1),
                       "threads": args.threads, "plan": plan, **scores, "distinct2": round(sample.distinct2, 4),
                       "sample": sample.text}
                print(json.dumps(row), flush=True)
                rows.append(row)
    append_rows(RESULTS, rows)


if __name__ == "__main__":
    main()
