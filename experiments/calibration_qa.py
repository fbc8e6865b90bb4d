"""Does calibrating on in-format QA text give shared plans back their context-QA? (issue 15)

Under every calibrated shared plan the demo's models score context-QA F1 near 0, while the one-plan
model, fine-tuned on fictional QA records under its plan, scores 0.27-0.59. This asks whether the
closed-form calibration alone gets part of that back when its data includes the same kind of
records. For the former demo's fine-tunes (experiments/former_demo.py; ``base``: the untrained
model), with the data of a finished demo folder, it calibrates every:2 and every:4 exactly
as ``make demo`` does (8,192 tokens, 10 refinement steps at lr 3e-3), on:

- ``sotu``: State of the Union 1990-2006 (the demo's calibration text);
- ``sotu+qa``: the same text followed by the demo's fictional QA *training* records, written out
  as ``Context: ...\\nQuestion: ...\\nAnswer: ...`` (no invented name of a test record is in them;
  the calibration chunks are spread evenly over the joined text, so about half are QA).

Then it scores held-out SOTU 2007-2021 (4,096 tokens, 256-token windows) and the demo's 16 test
questions under both plans. Appends to experiments/results/calibration_qa.json.

    make demo
    .venv/bin/python experiments/calibration_qa.py --demo runs/demo --checkpoints rcla,base
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from kvroute.calibrate import CalibrationConfig, calibrate_checkpoint  # noqa: E402
from kvroute.data.qa import read_qa  # noqa: E402
from kvroute.evaluate import EvalConfig, evaluate  # noqa: E402
from common import append_rows, sotu  # noqa: E402
from former_demo import former_demo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "calibration_qa.json"
PLANS = "every:2,every:4"
VARIANTS = ("sotu", "sotu+qa")


def qa_text(records_path: Path, out: Path) -> Path:
    """The training records as plain text, one record per document, answer included."""
    out.parent.mkdir(parents=True, exist_ok=True)
    docs = [f"Context: {r.context}\nQuestion: {r.question}\nAnswer: {r.answers[0]}" for r in read_qa([records_path])]
    out.write_text("\n\n".join(docs), encoding="utf-8")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default=str(ROOT / "runs" / "demo"), help="a finished `make demo` folder")
    parser.add_argument("--checkpoints", default="rcla,base", help="former demo runs to calibrate, standard or rcla (base: the untrained model)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    demo = Path(args.demo)
    runs = ROOT / "runs" / "calibration_qa"
    data = {"sotu": sotu(1990, 2006)}
    data["sotu+qa"] = data["sotu"] + [str(qa_text(demo / "data/fictional/train.jsonl", runs / "qa_train.txt"))]
    rows = []
    for name in args.checkpoints.split(","):
        checkpoint = ROOT / "assets" / "smollm2-135m" if name == "base" else former_demo(name)
        for variant in args.variants.split(","):
            out = runs / f"{name}-{variant.replace('+', '-')}"
            start = time.perf_counter()
            calibrate_checkpoint(str(checkpoint), PLANS, data[variant], CalibrationConfig(steps=10, lr=3e-3),
                                 out=out, progress=False)
            fit_seconds = time.perf_counter() - start
            writer = evaluate(EvalConfig(checkpoints=[str(out)], plans=PLANS, out=str(out / "eval"),
                                         text=[str(demo / "data/sotu-2007-2021")], window=256, stride=256,
                                         max_tokens=4096, qa=[str(demo / "data/fictional/test.jsonl")], limit=16,
                                         max_new_tokens=16), progress=False)
            for plan in PLANS.split(","):
                scores = {r["metric"]: round(r["value"], 4) for r in writer.rows
                          if r["plan"].startswith(plan) and r["metric"] in ("perplexity", "f1", "exact_match")}
                row = {"checkpoint": name, "calibration_data": variant, "plan": plan,
                       "fit_seconds": round(fit_seconds, 1), "threads": args.threads, **scores}
                print(json.dumps(row), flush=True)
                rows.append(row)
    append_rows(RESULTS, rows)


if __name__ == "__main__":
    main()
