"""The former demo's fine-tunes, which many earlier results start from (issue 15).

Until stop 37, ``make demo`` fine-tuned SmolLM2 60 steps (4 x 256 tokens, lr 4e-4, cosine, seed 0)
on State of the Union 1790-2006, standard (``--routing none``) and R-CLA (p=0.6, plan sources,
distillation from the frozen base, weight 1), and calibrated each for every:2 and every:4
(8,192 tokens of SOTU 1990-2006, closed form then 10 steps at lr 3e-3). The demo now trains the
pairs mix with QA instead (scripts/demo.py); the experiments that compare against the former
checkpoints (calibration.py, calibration_qa.py, hidden_distill.py, greedy_loops.py, pair_maps.py,
vllm_fp8_kv.py) take them from here, trained into runs/demo-former/ when missing.

    .venv/bin/python experiments/former_demo.py          # both, and their calibrations
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "demo-former"
BASE = ROOT / "assets" / "smollm2-135m"
RECIPES = {
    "standard": dict(routing="none"),
    "rcla": dict(routing="rcla", p=0.6, sources="plan", distill=1.0, distill_from="base"),
}


def former_demo(name: str, calibrated: bool = False) -> Path:
    """``runs/demo-former/NAME/final`` (``standard`` or ``rcla``), or with ``calibrated`` its
    every:2 / every:4 calibration ``runs/demo-former/NAME-cal``; trained or fitted if missing."""
    from common import sotu
    from kvroute.calibrate import CalibrationConfig, calibrate_checkpoint
    from kvroute.train import TrainConfig, train

    if name not in RECIPES:
        raise ValueError(f"former demo runs are {', '.join(RECIPES)}, not {name!r}")
    final = OUT / name / "final"
    if not (final / "config.json").is_file():
        train(TrainConfig(model=str(BASE), data=sotu(1790, 2006), output_dir=str(OUT / name), seq_len=256,
                          batch_size=4, max_steps=60, lr=4e-4, warmup=0.05, schedule="cosine", seed=0, device="cpu",
                          eval_every=0, save_every=30, plan="full", **RECIPES[name]))
    if not calibrated:
        return final
    cal = OUT / f"{name}-cal"
    if not (cal / "kvroute_calibration.safetensors").is_file():
        calibrate_checkpoint(str(final), "every:2,every:4", sotu(1990, 2006), CalibrationConfig(steps=10, lr=3e-3),
                             out=cal)
    return cal


if __name__ == "__main__":
    for run in RECIPES:
        print(former_demo(run, calibrated=True))
