"""Ablation: fixed CLA and RD-CLA against R-CLA (issue 9, section 2; the paper's Table 3).

Same model, data, tokenizer and budget as pretrain.py (common.py). Trains, from
scratch, CLA@2 and CLA@4 (fixed groups of k layers reading the group's first
layer's KV) and RD-CLA@2 / RD-CLA@4 (the same groups, each layer keeping its own KV
with p = 0.6), and compares them with the R-CLA runs of pretrain.py (p = 0.75 and
0.5, reused, trained first if missing) and the standard model (p = 1.0), all
scored on the held-out text under full, every:2, every:4 and every:8.

Writes experiments/results/ablation.json and docs/img/ablation.png.
Rerunnable: finished runs and evaluations are skipped (outputs in runs/experiments/).

    .venv/bin/python experiments/ablation.py --jobs 2   # after pretrain.py (it reuses 3 of its runs)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402
from pretrain import DEEP_PLANS, RUNS as PRETRAIN_RUNS  # noqa: E402

RD_P = 0.6
#: name -> (routing, p, layers); the pt_* runs are shared with pretrain.py
RUNS = {
    "abl_cla2": ("cla:2", None, 8),
    "abl_cla4": ("cla:4", None, 8),
    "abl_rdcla2": ("rdcla:2", RD_P, 8),
    "abl_rdcla4": ("rdcla:4", RD_P, 8),
    "pt_p0.50": PRETRAIN_RUNS["pt_p0.50"],
    "pt_p0.75": PRETRAIN_RUNS["pt_p0.75"],
    "pt_p1.00": PRETRAIN_RUNS["pt_p1.00"],
}
LABELS = {"abl_cla2": "CLA@2", "abl_cla4": "CLA@4", "abl_rdcla2": f"RD-CLA@2 (p={RD_P})",
          "abl_rdcla4": f"RD-CLA@4 (p={RD_P})", "pt_p0.50": "R-CLA p=0.5", "pt_p0.75": "R-CLA p=0.75",
          "pt_p1.00": "standard (p=1.0)"}


def run_one(name: str) -> dict:
    """Train (cached) and score (cached) one run; returns its result entry."""
    summary = c.train_run(name, *RUNS[name])
    return {**summary, "label": LABELS[name], "loss": c.loss_table(c.eval_run(name, DEEP_PLANS))}


def collect(runs: dict[str, dict]) -> None:
    results = {"experiment": "ablation", "machine": c.machine(), "model": {"preset": c.PRESET_FIELDS},
               "train": {**c.TRAIN, "betas": list(c.TRAIN["betas"])}, "eval": c.EVAL, "split": c.setup(),
               "plans": DEEP_PLANS, "train_wall_s_total": round(sum(r["wall_s"] for r in runs.values()), 1),
               "runs": runs}
    c.write_json(c.RESULTS / "ablation.json", results)
    plot(results)


def main(argv: list[str] | None = None) -> None:
    c.run_experiment(__file__, list(RUNS), run_one, collect, argv, results_file=c.RESULTS / "ablation.json",
                     key_of=lambda n: c.run_key(*RUNS[n]))


def plot(results: dict) -> None:
    styles = {"abl_cla2": "s--", "abl_cla4": "s:", "abl_rdcla2": "^--", "abl_rdcla4": "^:",
              "pt_p0.50": "o-", "pt_p0.75": "o-", "pt_p1.00": "x-"}
    lines = [{"label": LABELS[n], "table": r["loss"], "style": styles[n], "annotate": False}
             for n, r in results["runs"].items()]
    c.plot_lines(lines, c.IMG / "ablation.png", "CLA / RD-CLA / R-CLA, from scratch")


if __name__ == "__main__":
    main()
