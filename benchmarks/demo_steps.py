"""Seconds per training step of each `make demo` fine-tune, on the demo's own checkpoints and data.

The three recipes of scripts/demo.py (the standard fine-tune, the R-CLA pairs mix with logit and
hidden-state distillation, the text stage with greedy rollouts), each built with the demo's
settings and started from the demo's checkpoints under DEMO_DIR, timed for a few steps after a
warm-up. To compare two versions of kvroute on the same machine, run it once per source tree:

    git worktree add /tmp/before fa861ef~1
    PYTHONPATH=/tmp/before/src .venv/bin/python benchmarks/demo_steps.py --json before.json
    .venv/bin/python benchmarks/demo_steps.py --json after.json

`--beside STAGE` times the stages while another process runs STAGE's steps with one thread, as the
demo's parallel stages do (scripts/demo.py, ``stages()``): what a stage's threads buy when the other
core is busy too.

Needs `make demo` to have run (runs/demo). Not a test: its numbers go into docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import demo  # noqa: E402  (scripts/demo.py: the recipes and data split)


def stage_config(stage: str, demo_dir: Path):
    """The demo's TrainConfig of ``stage`` (``standard``, ``mix``, ``text``), writing nothing to keep."""
    from kvroute.train import TrainConfig

    calib = demo.calibration_text(demo.split_sotu()[0])
    mix = calib + [str(demo_dir / "data" / "fictional" / "train.jsonl")]
    start, data, recipe, batch = {
        "standard": (demo.MODEL, mix, demo.STANDARD, 4),
        "mix": (demo_dir / "base-pairs", mix, demo.RCLA, demo.BATCH),
        "text": (demo_dir / "rcla-mix" / "final", calib, demo.TEXT_STAGE, demo.BATCH),
    }[stage]
    if not Path(start).is_dir():
        sys.exit(f"demo_steps: {start} is missing; run `make demo` (or pass --demo-dir)")
    settings = {"lr": demo.LR, "warmup": 0.05, "schedule": "cosine", **recipe}  # a recipe may set its own
    out = f"/tmp/kvroute-demo-steps-{stage}-{os.getpid()}"  # a --beside process has its own
    return TrainConfig(model=str(start), data=data, output_dir=out, seq_len=256,
                       batch_size=batch, max_steps=1000, seed=0, device="cpu", eval_every=0, save_every=0, quiet=True,
                       **settings)


def time_stage(stage: str, demo_dir: Path, warmup: int, steps: int) -> dict:
    from kvroute.train import _Run

    run = _Run(stage_config(stage, demo_dir))
    run.model.train()
    times, rolled = [], []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        info = run.train_step()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
            rolled.append(any(route in run.plan_of_route for route in info.routes) and bool(run.config.rollouts))
    return {"mean_s": statistics.fmean(times), "median_s": statistics.median(times), "steps": len(times),
            "times_s": [round(t, 3) for t in times], "rollout_steps": sum(rolled)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="standard,mix,text", help="comma-separated: standard, mix, text")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per stage")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--demo-dir", default="runs/demo", help="a `make demo` output folder")
    parser.add_argument("--beside", choices=("standard", "mix", "text"),
                        help="time them while another process trains this stage with one thread")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    neighbour = None
    if args.beside:  # steps enough to outlast the timed stages; stopped when they are done
        neighbour = subprocess.Popen([sys.executable, __file__, "--stages", args.beside, "--steps", "100000",
                                      "--warmup", "0", "--threads", "1", "--demo-dir", args.demo_dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        time.sleep(20)  # its model loaded and stepping before the timing starts
    import kvroute
    from kvroute.precision import cpu_model, resolve_precision

    source = Path(kvroute.__file__).resolve().parents[2]
    rev = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip() or "unknown"
    try:
        results = {stage: time_stage(stage, Path(args.demo_dir), args.warmup, args.steps)
                   for stage in args.stages.split(",")}
        if neighbour is not None and neighbour.poll() is not None:  # the timing above was not beside it
            sys.exit(f"demo_steps: the --beside {args.beside} process stopped early (exit {neighbour.returncode})")
    finally:
        if neighbour is not None:
            neighbour.kill()
    record = {"kvroute_source": str(source), "git_rev": rev, "cpu": cpu_model(), "threads": args.threads,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "precision": resolve_precision("auto", "cpu"),
              "torch": torch.__version__, "args": vars(args), "results": results}
    beside = f", beside a 1-thread {args.beside} process" if args.beside else ""
    print(f"kvroute {rev} ({source}), {record['cpu']}, {args.threads} threads{beside}, {record['precision']}")
    for stage, r in results.items():
        print(f"{stage:<9} {r['mean_s']:6.2f} s/step (median {r['median_s']:.2f}; {r['rollout_steps']} of "
              f"{r['steps']} with rollouts)")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
