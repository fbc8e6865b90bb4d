"""Layer-wise hidden-state distillation, isolated: the former demo's R-CLA recipe with and without it.

Trains the former demo's R-CLA fine-tune (experiments/former_demo.py: 60 steps of 4 x 256 SOTU
1790-2006 tokens, p=0.6, plan sources, KL distillation from the frozen base with weight 1, lr 4e-4,
cosine, seed 0, bf16 autocast) once more with ``distill_hidden`` added, calibrates it like the
former demo (every:2 and every:4, closed form plus 30 refinement steps on SOTU 1990-2006), and
scores both it and the former demo's R-CLA checkpoints on the demo's held-out text (SOTU 2007-2021
and Moby Dick, 4,096 tokens each, 256-token windows).

    make demo                                           # runs/demo/data (held-out text)
    .venv/bin/python experiments/hidden_distill.py [--weight 1.0]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from common import sotu  # noqa: E402
from former_demo import former_demo  # noqa: E402
from kvroute.calibrate import CalibrationConfig, calibrate_checkpoint  # noqa: E402
from kvroute.evaluate import EvalConfig, evaluate  # noqa: E402
from kvroute.train import TrainConfig, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "runs" / "demo"
MOBY = ROOT / "assets" / "text" / "moby" / "data"
OUT = ROOT / "runs" / "hidden_distill"
RESULTS = ROOT / "experiments" / "results" / "hidden_distill"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weight", type=float, default=1.0, help="distill_hidden weight")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not (DEMO / "data" / "sotu-2007-2021").exists():
        raise SystemExit(f"{DEMO / 'data' / 'sotu-2007-2021'} is missing: run `make demo` first")
    former, former_cal = former_demo("rcla"), former_demo("rcla", calibrated=True)
    name = f"rcla-hidden{args.weight:g}"
    start = time.time()
    final = OUT / name / "final"
    if not (final / "config.json").is_file():
        train(TrainConfig(model=str(ROOT / "assets" / "smollm2-135m"), data=sotu(1790, 2006),
                          output_dir=str(OUT / name), seq_len=256, batch_size=4, max_steps=60, lr=4e-4,
                          warmup=0.05, schedule="cosine", seed=0, device="cpu", eval_every=0, save_every=60,
                          routing="rcla", p=0.6, sources="plan", distill=1.0, distill_from="base",
                          distill_hidden=args.weight, plan="full"))
    minutes = {"train": (time.time() - start) / 60}
    cal = OUT / f"{name}-cal"
    if not (cal / "kvroute_calibration.safetensors").is_file():
        calibrate_checkpoint(str(final), "every:2,every:4", sotu(1990, 2006), CalibrationConfig(steps=30), out=cal)
    minutes["calibrate"] = (time.time() - start) / 60 - minutes["train"]
    texts = dict(text=[str(DEMO / "data" / "sotu-2007-2021"), str(MOBY)], window=256, stride=256, max_tokens=4096)
    plain = evaluate(EvalConfig(checkpoints=[str(former), str(final)], plans="full,every:2,every:4",
                                out=str(RESULTS / "plain"), **texts))
    calibrated = evaluate(EvalConfig(checkpoints=[str(former_cal), str(cal)], plans="every:2,every:4",
                                     out=str(RESULTS / "calibrated"), **texts))
    rows = [{k: r[k] for k in ("checkpoint", "plan", "calibrated", "data", "metric", "value")}
            for w in (plain, calibrated) for r in w.rows if r["metric"] == "perplexity"]
    (RESULTS / "summary.json").write_text(json.dumps({"weight": args.weight, "minutes": minutes, "rows": rows},
                                                     indent=1) + "\n")
    for r in rows:
        print(f"{Path(r['checkpoint']).parent.name if r['checkpoint'].endswith('final') else Path(r['checkpoint']).name:28s}"
              f" {r['plan']:8s} {Path(r['data']).name:16s} {r['value']:9.2f}")


if __name__ == "__main__":
    main()
