"""Does bf16 autocast cost quality? The demo's R-CLA fine-tune in fp32 and in bf16 (issue 15, item 4).

Runs the demo's R-CLA recipe (SmolLM2-135M, 60 steps of 4 x 256 State of the Union 1790-2006
tokens, lr 4e-4, p=0.6, plan sources, distillation from the frozen base, seed 0) at the given
precision and evaluates it exactly as `make demo` does (held-out SOTU 2007-2021 and Moby Dick,
4,096 tokens each, 256-token windows) under full, every:2 and every:4. Appends the perplexities
and the training time to experiments/results/precision_check.json.

    .venv/bin/python experiments/precision_check.py --precision bf16
    .venv/bin/python experiments/precision_check.py --precision fp32
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from kvroute.evaluate import EvalConfig, evaluate  # noqa: E402
from kvroute.train import TrainConfig, train  # noqa: E402
from common import sotu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MOBY = ROOT / "assets" / "text" / "moby" / "data"
BASE = ROOT / "assets" / "smollm2-135m"
OUT = ROOT / "runs" / "precision_check"
RESULTS = ROOT / "experiments" / "results" / "precision_check.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", choices=["bf16", "fp32"], required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_files = sotu(1700, 2006)
    held = OUT / "data" / "sotu-2007-2021"
    held.mkdir(parents=True, exist_ok=True)
    for f in map(Path, sotu(2007, 2100)):
        if not (held / f.name).exists():
            (held / f.name).write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    start = time.perf_counter()
    result = train(TrainConfig(
        model=str(BASE), data=train_files, output_dir=str(OUT / f"rcla-{args.precision}-{args.steps}"), seq_len=256,
        batch_size=4, max_steps=args.steps, lr=4e-4, warmup=0.05, schedule="cosine", seed=0, device="cpu",
        eval_every=0, save_every=args.steps, routing="rcla", p=0.6, sources="plan", distill=1.0,
        distill_from="base", precision=args.precision, quiet=True,
    ))
    minutes = (time.perf_counter() - start) / 60
    writer = evaluate(EvalConfig(checkpoints=[str(result.final_checkpoint)], plans="full,every:2,every:4",
                                 text=[str(held), str(MOBY)], window=256, stride=256, max_tokens=4096,
                                 out=str(OUT / f"eval-{args.precision}")))
    ppl = {f"{Path(r['data']).parts[-2 if Path(r['data']).name == 'data' else -1]}/{r['plan']}": r["value"]
           for r in writer.rows if r["metric"] == "perplexity"}
    row = {"precision": args.precision, "steps": args.steps, "threads": args.threads,
           "train_minutes": round(minutes, 2), "seconds_per_step": round(60 * minutes / args.steps, 2),
           "perplexity": ppl}
    print(json.dumps(row, indent=1))
    rows = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    RESULTS.write_text(json.dumps(rows + [row], indent=1) + "\n")
    print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
