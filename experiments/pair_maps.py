"""Pairwise maps: one calibration for every plan, and trained inside R-CLA (issue 15, item 3).

Compares, on held-out State of the Union 2007-2021 and Moby Dick (perplexity, 4,096 tokens
each), the demo's 16 fictional context-QA questions (F1) and a 64-token greedy continuation
(distinct-2), under full, every:2 and every:4:

- ``base+pairs``: the untrained SmolLM2 with closed-form pairwise maps (``kvroute calibrate
  --pairs`` on SOTU 1990-2006), one fit for every plan;
- ``rcla+pairs``: the former demo's R-CLA checkpoint (experiments/former_demo.py) with closed-form pairwise maps (post hoc);
- ``rcla-pairs-trained``: the former demo's R-CLA recipe (60 steps, p=0.6, plan sources, distillation
  from the frozen base, lr 4e-4, bf16) started from ``base+pairs`` with ``--pair-maps``, so the
  maps train with the routes;
- with ``--maps-only`` (not yet measured), also ``base+pairs-maps-only``: ``base+pairs`` with only the maps trained on R-CLA routes (60 steps,
  p=0.6, plan sources, KL to the full cache, lr 1e-3; ``--pair-maps --maps-only``): a
  calibration for every plan with no weight change;
- with ``--plan-cal``, also ``rcla-pairs-trained+cal``: ``rcla-pairs-trained`` with the demo's
  per-plan calibration on top (every:2 and every:4; closed form plus 30 refinement steps on SOTU
  1990-2006), which takes precedence over the pairs under those two plans;
- for reference, the per-plan calibrations ``base+cal`` (``make demo``) and ``rcla+cal`` (the
  former demo's) when runs/demo and runs/demo-former hold them.

Writes experiments/results/pair_maps.json; a rerun reuses finished checkpoints and the scores
already in that file.

    .venv/bin/python experiments/pair_maps.py            # about 45 min on 2 idle cores
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
from kvroute.calibrate import CalibrationConfig, calibrate_checkpoint, calibration_data, is_calibrated, mean_loss  # noqa: E402
from kvroute.data.qa import read_qa  # noqa: E402
from kvroute.data.fictional import write_fictional_qa  # noqa: E402
from kvroute.evaluate import qa_score  # noqa: E402
from kvroute.generate import generate  # noqa: E402
from kvroute.models import load_tokenizer  # noqa: E402
from kvroute.pairs import read_pair_maps  # noqa: E402
from kvroute.train import TrainConfig, train  # noqa: E402
from common import sotu  # noqa: E402
from former_demo import OUT as FORMER, former_demo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MOBY = ROOT / "assets" / "text" / "moby" / "data"
BASE = ROOT / "assets" / "smollm2-135m"
DEMO = ROOT / "runs" / "demo"
OUT = ROOT / "runs" / "pair_maps"
RESULTS = ROOT / "experiments" / "results" / "pair_maps.json"
PROMPT = "In his address to Congress, the President said that"
PLANS = ["full", "every:2", "every:4"]
DEMO_RCLA = dict(routing="rcla", p=0.6, sources="plan", distill=1.0, distill_from="base")


def rcla(name: str, start: Path, steps: int, **extra) -> Path:
    final = OUT / name / "final"
    if not (final / "config.json").is_file():
        recipe = dict(model=str(start), data=sotu(1790, 2006), output_dir=str(OUT / name), seq_len=256,
                      batch_size=4, max_steps=steps, lr=4e-4, warmup=0.05, schedule="cosine", seed=0,
                      device="cpu", eval_every=0, save_every=steps, quiet=True, **DEMO_RCLA)
        train(TrainConfig(**{**recipe, **extra}))
    return final


def with_pairs(name: str, checkpoint: Path, tokens: int) -> tuple[Path, dict]:
    out = OUT / name
    if not (out / "kvroute_pairs.safetensors").is_file():
        _, (fit,) = calibrate_checkpoint(str(checkpoint), "every:2,every:4", sotu(1990, 2006),
                                         CalibrationConfig(tokens=tokens), out=out, pairs=True)
        return out, {"seconds": fit.seconds, "pairs": fit.pairs}
    meta, _ = read_pair_maps(out)
    return out, {k: meta["info"]["fit"][k] for k in ("seconds", "pairs")}


def score(checkpoint: Path, tok, plans: list[str], texts: dict[str, torch.Tensor], qa: list) -> dict[str, dict]:
    model = kvroute.load(checkpoint)
    out = {}
    for plan in plans:
        kvroute.set_plan(model, plan)
        with torch.no_grad():
            ppl = {name: math.exp(mean_loss(model, chunks)) for name, chunks in texts.items()}
        qa_scores, _ = qa_score(model, tok, qa, max_new_tokens=16)
        sample = generate(model, tok, PROMPT, max_new_tokens=64)
        out[plan] = {**{f"ppl_{k}": v for k, v in ppl.items()}, "f1": qa_scores["f1"],
                     "exact_match": qa_scores["exact_match"], "distinct2": sample.distinct2,
                     "calibrated": is_calibrated(model, plan), "sample": sample.text}
        print(f"  {checkpoint.name} {plan}: " + " ".join(f"{k} {v:.1f}" for k, v in ppl.items())
              + f" f1 {qa_scores['f1']:.3f} distinct-2 {sample.distinct2:.2f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens of the pairwise fit")
    parser.add_argument("--steps", type=int, default=60, help="R-CLA steps (the demo's)")
    parser.add_argument("--pair-lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--maps-only", action="store_true", help="also train only the maps of base+pairs")
    parser.add_argument("--plan-cal", action="store_true",
                        help="also calibrate rcla-pairs-trained per plan (every:2, every:4) on top of its pairs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(BASE)
    texts = {"sotu": calibration_data(tok, sotu(2007, 2100), 4096, 256),
             "moby": calibration_data(tok, [str(MOBY)], 4096, 256)}
    qa = read_qa([write_fictional_qa(OUT / "data", train=2000, test=16, seed=0)["test"]])  # the demo's questions
    timings: dict[str, float] = {}

    t = time.perf_counter()
    demo_rcla = former_demo("rcla") if args.steps == 60 else rcla("rcla", BASE, args.steps)
    timings["rcla_minutes"] = (time.perf_counter() - t) / 60
    base_pairs, fit_base = with_pairs("base-pairs", BASE, args.tokens)
    rcla_pairs, fit_rcla = with_pairs("rcla-pairs", demo_rcla, args.tokens)
    t = time.perf_counter()
    trained = rcla("rcla-pairs-trained", base_pairs, args.steps, pair_maps=True, pair_lr=args.pair_lr)
    timings["rcla_pairs_trained_minutes"] = (time.perf_counter() - t) / 60
    t = time.perf_counter()
    maps_only = None if not args.maps_only else rcla("base-pairs-maps-only", base_pairs, args.steps, pair_maps=True, maps_only=True, lr=1e-3,
                     distill_from="self")
    timings["maps_only_minutes"] = (time.perf_counter() - t) / 60

    trained_cal = None
    if args.plan_cal:
        trained_cal = OUT / "rcla-pairs-trained-cal"
        if not (trained_cal / "kvroute_calibration.safetensors").is_file():
            t = time.perf_counter()
            calibrate_checkpoint(str(trained), "every:2,every:4", sotu(1990, 2006), CalibrationConfig(steps=30),
                                 out=trained_cal)
            timings["plan_cal_minutes"] = (time.perf_counter() - t) / 60

    models = {"base": BASE, "base+pairs": base_pairs, "base+pairs-maps-only": maps_only, "rcla": demo_rcla,
              "rcla+pairs": rcla_pairs, "rcla-pairs-trained": trained,
              "rcla-pairs-trained+cal": trained_cal}
    models = {k: v for k, v in models.items() if v is not None}
    for folder in (DEMO / "base-cal", FORMER / "rcla-cal"):
        if (folder / "kvroute_calibration.safetensors").is_file():
            models[folder.name.replace("-", "+")] = folder
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    same = all(old.get(k) == v for k, v in (("tokens", args.tokens), ("steps", args.steps), ("pair_lr", args.pair_lr)))
    rows = {}
    for name, checkpoint in models.items():
        if same and name in old.get("scores", {}):
            rows[name] = old["scores"][name]
            continue
        print(name, flush=True)
        rows[name] = score(checkpoint, tok, PLANS, texts, qa)
    timings = {**(old.get("timings", {}) if same else {}), **{k: v for k, v in timings.items() if v > 0.05}}
    result = {"tokens": args.tokens, "steps": args.steps, "pair_lr": args.pair_lr, "threads": args.threads,
              "fit": {"base+pairs": fit_base, "rcla+pairs": fit_rcla}, "timings": timings,
              "checkpoints": {k: str(v) for k, v in models.items()}, "scores": rows}
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
