"""Context-QA under a shared cache: does task data in the fine-tune make shared plans answer? (issue 15)

Calibration alone leaves fictional context-QA F1 at 0 under every shared plan (`make demo`).
This experiment puts the task into the fine-tune instead: State of the Union 1790-2006 text mixed with fictional QA
training records (answer-only loss; ``kvroute data fictional-qa``; no name of a test record
appears in them), bf16 autocast. Two recipes:

- ``plan``: calibrate the untrained SmolLM2 for PLAN (closed form), then ``--routing plan:PLAN``
  (one model for one plan);
- ``rcla``: R-CLA (p=0.6, plan sources) on the same mix, then calibrate every:2 and every:4
  (one model for every plan); ``--routing`` trains with another policy instead, e.g. R-CLA on
  half the passes and the plans you expect to deploy on the other half
  (``mix:rcla:p=0.6,sources=plan|plan:every:2+every:4``), and ``--plans`` names the plans to
  calibrate and score (add one the routing does not name, e.g. every:3, to see that the model
  still serves any plan). ``--calibrated-start`` starts from the untrained model calibrated
  (closed form) for the plans the routing names, whose maps then act on their passes and stay;
  the plans it does not name are calibrated after training.

Scores held-out SOTU 2007-2021 perplexity (4,096 tokens), fictional test QA (greedy, F1 and
exact match) and distinct-2 of a 64-token greedy continuation, under each plan. Appends to
experiments/results/qa_under_sharing.json.

    .venv/bin/python experiments/qa_under_sharing.py --recipe plan --plan every:2
    .venv/bin/python experiments/qa_under_sharing.py --recipe rcla
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import kvroute  # noqa: E402
from kvroute.calibrate import (  # noqa: E402
    CalibrationConfig, calibrate, calibrate_checkpoint, calibration_data, is_calibrated, mean_loss,
)
from kvroute.data.qa import read_qa  # noqa: E402
from kvroute.data.fictional import write_fictional_qa  # noqa: E402
from kvroute.evaluate import qa_score  # noqa: E402
from kvroute.generate import generate  # noqa: E402
from kvroute.models import load_tokenizer  # noqa: E402
from kvroute.train import TrainConfig, train  # noqa: E402
from common import slug, sotu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "assets" / "smollm2-135m"
OUT = ROOT / "runs" / "qa_under_sharing"
RESULTS = ROOT / "experiments" / "results" / "qa_under_sharing.json"
PROMPT = "In his address to Congress, the President said that"


def score(model: torch.nn.Module, tok, plans: list[str], held: torch.Tensor, qa: list) -> dict[str, dict]:
    out = {}
    for plan in plans:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a plan-only model warns off its plan
            kvroute.set_plan(model, plan)
        qa_scores, predictions = qa_score(model, tok, qa, max_new_tokens=16)
        sample = generate(model, tok, PROMPT, max_new_tokens=64)
        out[plan] = {"ppl": math.exp(mean_loss(model, held)), **qa_scores, "distinct2": sample.distinct2,
                     "calibrated": plan != "full" and is_calibrated(model, plan),
                     "sample": sample.text, "answers": [(p["prediction"], p["answers"][0]) for p in predictions[:8]]}
        print(f"{plan}: ppl {out[plan]['ppl']:.1f} f1 {qa_scores['f1']:.3f} em {qa_scores['exact_match']:.3f} "
              f"distinct-2 {sample.distinct2:.2f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=["plan", "rcla"], default="plan")
    parser.add_argument("--plan", default="every:2", help="the plan of the plan recipe")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--pair-lr", type=float, default=None,
                        help="with --pair-maps: the maps' learning rate (default: --lr)")
    parser.add_argument("--distill", type=float, default=0.0, help="distillation weight (teacher: --distill-from)")
    parser.add_argument("--distill-hidden", type=float, default=0.0,
                        help="hidden-state distillation weight (teacher: --distill-from)")
    parser.add_argument("--distill-from", default="base", choices=["base", "self"],
                        help="the teacher: the frozen base's full cache, or the model's own full cache as it trains")
    parser.add_argument("--text-from", type=int, default=1790,
                        help="first State of the Union year in the mix (later: less text, a larger QA share)")
    parser.add_argument("--qa-train", type=int, default=2000, help="fictional QA training records")
    parser.add_argument("--qa-test", type=int, default=32)
    parser.add_argument("--no-calibration", action="store_true")
    parser.add_argument("--pair-maps", action="store_true",
                        help="rcla: start from closed-form pairwise maps of the base (experiments/pair_maps.py "
                             "writes runs/pair_maps/base-pairs) and train them with the routes")
    parser.add_argument("--routing", default="rcla:p=0.6,sources=plan",
                        help="rcla recipe: the routing policy (kvroute train --routing)")
    parser.add_argument("--plans", default="every:2,every:4", help="rcla recipe: the shared plans to calibrate and score")
    parser.add_argument("--calibrated-start", action="store_true",
                        help="rcla recipe: start from the base calibrated for the plans --routing names")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32", "auto"],
                        help="training precision (bf16 is native on AMX CPUs only)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="training seed (routes, batches); the QA records stay seed 0")
    parser.add_argument("--score-only", action="store_true",
                        help="skip training: calibrate and score the final checkpoint that the same flags trained before")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(BASE)
    data = write_fictional_qa(OUT / "data", train=args.qa_train, test=args.qa_test, seed=0)
    cal = not args.no_calibration
    target = args.plan if args.recipe == "plan" else "any"
    name = f"{args.recipe}-{target}-{args.steps}-d{args.distill:g}-h{args.distill_hidden:g}" + ("" if cal else "-nocal") + (
        f"-text{args.text_from}" if args.text_from != 1790 else "")
    name = (name + ("-pairs" if args.pair_maps else "")).replace(":", "")
    if args.recipe == "rcla" and args.routing != parser.get_default("routing"):
        name += "-" + slug(args.routing)
    if args.precision != "bf16":
        name += f"-{args.precision}"
    if args.lr != parser.get_default("lr"):
        name += f"-lr{args.lr:g}"
    if args.pair_lr is not None:
        name += f"-plr{args.pair_lr:g}"
    if args.calibrated_start:
        name += "-calstart"
    if args.distill_from != "base":
        name += f"-from{args.distill_from}"
    if args.seed:
        name += f"-seed{args.seed}"
    start = time.perf_counter()
    model_start = str(BASE)
    if args.recipe == "plan" and cal:
        folder = OUT / f"base-cal-{args.plan.replace(':', '')}"
        if not (folder / "kvroute_calibration.safetensors").is_file():
            calibrate_checkpoint(str(BASE), args.plan, sotu(1990, 2006), CalibrationConfig(), out=folder)
        model_start = str(folder)
    routing = dict(routing=f"plan:{args.plan}") if args.recipe == "plan" else dict(routing=args.routing)
    if args.calibrated_start:
        named = kvroute.policy_from_spec(args.routing).drawn_plans
        if args.recipe != "rcla" or not named:
            parser.error("--calibrated-start goes with --recipe rcla and a --routing that names plans (plan:, mix:)")
        folder = OUT / ("base-cal-" + "-".join(named).replace(":", ""))
        if not (folder / "kvroute_calibration.safetensors").is_file():
            calibrate_checkpoint(str(BASE), ",".join(named), sotu(1990, 2006), CalibrationConfig(), out=folder)
        model_start = str(folder)
    if args.pair_maps:
        if args.recipe != "rcla":
            parser.error("--pair-maps goes with --recipe rcla")
        model_start = str(ROOT / "runs" / "pair_maps" / "base-pairs")
        if not (Path(model_start) / "kvroute_pairs.safetensors").is_file():
            calibrate_checkpoint(str(BASE), "every:2,every:4", sotu(1990, 2006), CalibrationConfig(tokens=2048),
                                 out=model_start, pairs=True)
        routing["pair_maps"] = True
        routing["pair_lr"] = args.pair_lr
    elif args.pair_lr is not None:
        parser.error("--pair-lr goes with --pair-maps")
    final = OUT / name / "final"
    if args.score_only and not (final / "config.json").is_file():
        parser.error(f"--score-only: {final} is missing; run the same flags without --score-only first")
    if not args.score_only:
        train(TrainConfig(
            model=model_start, data=sotu(args.text_from, 2006) + [str(data["train"])], output_dir=str(OUT / name),
            seq_len=256, batch_size=4, max_steps=args.steps, lr=args.lr, warmup=0.05, schedule="cosine", seed=args.seed,
            device="cpu", eval_every=0, save_every=args.steps, precision=args.precision, quiet=True, distill=args.distill,
            distill_hidden=args.distill_hidden, distill_from=args.distill_from, **routing,
        ))  # writes `final`
    train_min = None if args.score_only else (time.perf_counter() - start) / 60
    model = kvroute.load(final)
    shared = [plan.strip() for plan in args.plans.split(",") if plan.strip()]
    plans = ["full", args.plan] if args.recipe == "plan" else ["full", *shared]
    kept = {}
    if args.recipe == "rcla" and cal:
        carried = kvroute.policy_from_spec(args.routing).drawn_plans if args.calibrated_start else ()
        fresh = [plan for plan in shared if plan not in carried]  # the maps it trained with stay
        if fresh:  # where trained pairwise maps serve a plan better, its fit is dropped (kept: False)
            fits = calibrate(model, ",".join(fresh), sotu(1990, 2006), CalibrationConfig(), tokenizer=tok, progress=False)
            kept = {fit.plan: fit.kept for fit in fits}
    held = calibration_data(tok, sotu(2007, 2100), 4096, 256)
    scores = score(model, tok, plans, held, read_qa([data["test"]]))
    base = kvroute.load(BASE)
    base_scores = score(base, tok, ["full"], held, read_qa([data["test"]]))["full"]
    row = {"recipe": args.recipe, "plan": args.plan if args.recipe == "plan" else None,
           "routing": routing["routing"], "calibrated_start": args.calibrated_start, "precision": args.precision,
           "steps": args.steps,
           "lr": args.lr, "distill": args.distill, "distill_hidden": args.distill_hidden,
           "distill_from": args.distill_from, "qa_train": args.qa_train, "qa_test": args.qa_test, "text_years": [args.text_from, 2006],
           "calibrated": cal, "pair_maps": args.pair_maps, "pair_lr": args.pair_lr, "seed": args.seed, "train_minutes": None if train_min is None else round(train_min, 2), "threads": args.threads,
           "score_only": args.score_only, "calibration_kept": kept,
           "scores": scores, "base_full": base_scores}
    rows = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    RESULTS.write_text(json.dumps(rows + [row], indent=1) + "\n")
    print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
