"""Pre-training from scratch with R-CLA (issue 9, section 3; the paper's Table 1 / Figure 5).

A Qwen3-style model (8 layers, hidden 128, 2 KV heads of 32 dims; see common.py) is
trained from scratch on State of the Union 1790-2006 + most of Moby Dick with
p in {1.0 (standard, routing none), 0.75, 0.5, 0.25}, and standard models of 4 and 2
layers (the same cache as the 8-layer model under every:2 / every:4) on the same
tokens. Every model is scored on held-out text (State of the Union 2007+, Moby Dick
chapters 15, 30, ..., 135): the 8-layer models under full, every:2, every:4, every:8,
the shallow ones under full.

Writes experiments/results/pretrain.json and docs/img/pretrain_loss_vs_cache.png.
Rerunnable: finished runs and evaluations are skipped (outputs in runs/experiments/).

    .venv/bin/python experiments/pretrain.py --jobs 2   # 1,500 steps of 8 x 256 tokens (KVR_STEPS to change)

KVR_NO_SEED_CHECK=1 skips the second-seed runs (standard 8 and 4 layers, R-CLA p=0.75).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402

DEEP_PLANS = ["full", "every:2", "every:4", "every:8"]
#: name -> (routing, p, layers)
RUNS = {
    "pt_p1.00": ("none", None, 8),
    "pt_p0.75": ("rcla", 0.75, 8),
    "pt_p0.50": ("rcla", 0.5, 8),
    "pt_p0.25": ("rcla", 0.25, 8),
    "pt_std_L4": ("none", None, 4),
    "pt_std_L2": ("none", None, 2),
}
#: second seeds of the runs behind the |S| = L/2 comparison: the run-to-run noise of this setup (last)
SEED_RUNS = {"pt_p1.00_seed1": ("none", None, 8, 1), "pt_std_L4_seed1": ("none", None, 4, 1),
             "pt_p0.75_seed1": ("rcla", 0.75, 8, 1)}


#: every run of this script: name -> (routing, p, layers, seed); the second seed last (it only measures noise)
ALL_RUNS = {**{n: (*v, 0) for n, v in RUNS.items()},
            **({} if os.environ.get("KVR_NO_SEED_CHECK") else SEED_RUNS)}


def run_one(name: str) -> dict:
    """Train (cached) and score (cached) one run; returns its result entry."""
    routing, p, layers, seed = ALL_RUNS[name]
    summary = c.train_run(name, routing, p, layers, seed=seed)
    plans = DEEP_PLANS if layers == c.LAYERS else ["full"]
    return {**summary, "loss": c.loss_table(c.eval_run(name, plans))}


def collect(runs: dict[str, dict]) -> None:
    results = {"experiment": "pretrain", "machine": c.machine(), "model": {"preset": c.PRESET_FIELDS},
               "train": {**c.TRAIN, "betas": list(c.TRAIN["betas"])}, "eval": c.EVAL, "split": c.setup(),
               "tokenizer": {"type": "byte-level BPE", "vocab": c.VOCAB, "trained_on": "train split only"},
               "train_wall_s_total": round(sum(r["wall_s"] for r in runs.values()), 1), "runs": runs}
    c.write_json(c.RESULTS / "pretrain.json", results)
    plot(results)


def main(argv: list[str] | None = None) -> None:
    c.run_experiment(__file__, list(ALL_RUNS), run_one, collect, argv)


def plot(results: dict) -> None:
    runs = results["runs"]

    def label(n: str) -> str:
        if runs[n]["p"] is None:
            return "p=1.0 (standard, 8 layers), seed 0"
        return f"R-CLA p={runs[n]['p']}" + (", seed 0" if f"{n}_seed1" in runs else "")

    lines = [{"label": label(n), "table": runs[n]["loss"], "style": "o-"}
             for n in ("pt_p1.00", "pt_p0.75", "pt_p0.50", "pt_p0.25") if n in runs]
    if "pt_p1.00_seed1" in runs:
        lines.append({"label": "p=1.0 (standard, 8 layers), seed 1", "table": runs["pt_p1.00_seed1"]["loss"],
                      "style": "x:", "annotate": False})
    if "pt_p0.75_seed1" in runs:
        lines.append({"label": "R-CLA p=0.75, seed 1", "table": runs["pt_p0.75_seed1"]["loss"],
                      "style": "x:", "annotate": False})
    if "pt_std_L4_seed1" in runs:
        lines.append({"label": "standard 4 layers, seed 1", "style": "k+", "annotate": False,
                      "table": {"4 layers": runs["pt_std_L4_seed1"]["loss"]["full"]}})
    shallow = {}
    for n, layers in (("pt_std_L2", 2), ("pt_std_L4", 4), ("pt_p1.00", 8)):
        if n in runs and "full" in runs[n]["loss"]:
            shallow[f"{layers} layers"] = runs[n]["loss"]["full"]
    if shallow:
        lines.append({"label": "standard, fewer layers (2/4/8), full cache", "table": shallow, "style": "ks--"})
    c.plot_lines(lines, c.IMG / "pretrain_loss_vs_cache.png",
                 f"from scratch, {c.TRAIN['max_steps'] * c.TRAIN['batch_size'] * c.TRAIN['seq_len']:,} tokens")


if __name__ == "__main__":
    main()
