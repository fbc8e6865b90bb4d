"""Sequence-level unlikelihood under the plans (``kvroute train --seq-unlikelihood``): does it stop greedy loops? (issue 15)

Token-level unlikelihood (``kvroute train --unlikelihood``) trains on reference text, where the
model seldom repeats itself, and left the loops under shared plans where they were. The
sequence-level form (:mod:`kvroute.train.rollouts`) trains on the model's own greedy
continuations: each micro-batch draws one of the plans, continues the first ``--prefix`` tokens
of its rows greedily under it (through the plan's shared cache, calibrated), and pushes down every
continuation token that is part of a repeated n-gram (``-log(1 - p)``), next to the LM loss on the
same rows under the same plan.

Starts from a checkpoint trained for the plans (default: the two-plan model of ``one_plan_demo.py
--variants plans2-steps120``) and trains ``--steps`` steps through ``kvroute.train`` on SOTU
1990-2006 mixed with the demo's fictional QA training records (``--text-only``: SOTU alone;
``--qa-records N``: only the first N QA records; ``--first-year``: more SOTU years; ``--prompts
text``: rollouts from the text rows only, ``kvroute train --seq-ul-prompts text``; ``--seq-distill
W``: on-policy distillation on the same rollouts, ``--teacher`` self or the frozen start; ``--distill W``:
logit distillation on the routed passes from the same teacher; ``--routing``:
another policy, e.g. a mix with R-CLA whose ``plan:`` parts' passes roll out; ``--steps 0``: score
the start as it is; ``--qa``/``--questions``: another QA test set; AdamW, constant lr). Scores what
``one_plan_demo.py`` scores, plus distinct-2 over ``greedy_loops.py``'s eight held-out prompts;
nothing comes from the held-out years. Appends to experiments/results/seq_unlikelihood.json (rows
with ``"loop": "kvroute train"``; the earlier rows came from this script's own training loop, commit
5376695, which drew LM rows and prefixes apart and trained on text only).

    make demo
    .venv/bin/python experiments/one_plan_demo.py --variants plans2-steps120
    .venv/bin/python experiments/seq_unlikelihood.py --steps 40 --weight 1
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from kvroute.data.qa import read_qa  # noqa: E402
from kvroute.evaluate import EvalConfig, evaluate  # noqa: E402
from kvroute.generate import generate  # noqa: E402
from kvroute.hf.patch import PlanMismatchWarning  # noqa: E402
from kvroute.models import load, load_tokenizer  # noqa: E402
from kvroute.plan import parse_plan_list  # noqa: E402
from kvroute.policy import policy_from_spec  # noqa: E402
from kvroute.train import TrainConfig, train  # noqa: E402
from common import append_rows, slug, sotu  # noqa: E402
from greedy_loops import prompts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "seq_unlikelihood.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default=str(ROOT / "runs" / "demo"), help="a finished `make demo` folder")
    parser.add_argument("--start", default=str(ROOT / "runs" / "one_plan_demo" / "plans2-steps120" / "final"))
    parser.add_argument("--plans", default="every:2,every:4",
                        help="the plans to train for; a weight draws one more often: every:2,3*every:4")
    parser.add_argument("--steps", type=int, default=40, help="0: score --start without training")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight", type=float, default=1.0, help="weight of the sequence-level unlikelihood")
    parser.add_argument("--seq-distill", type=float, default=0.0,
                        help="weight of on-policy distillation on the same rollouts (kvroute train --seq-distill)")
    parser.add_argument("--distill", type=float, default=0.0,
                        help="weight of logit distillation on the routed passes (kvroute train --distill)")
    parser.add_argument("--teacher", choices=["self", "base"], default="self",
                        help="--seq-distill's and --distill's teacher under the full cache (kvroute train "
                             "--distill-from): the model itself, or the frozen start")
    parser.add_argument("--batch", type=int, default=4, help="rows per step: LM rows, each also a rollout's prefix")
    parser.add_argument("--prefix", type=int, default=32)
    parser.add_argument("--continuation", type=int, default=48)
    parser.add_argument("--per-row", type=int, default=1,
                        help="rollout prompts per row (kvroute train --seq-ul-per-row), evenly spaced over it")
    parser.add_argument("--ngram", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-only", action="store_true",
                        help="train on SOTU 1990-2006 alone (default: mixed with the demo's fictional QA records)")
    parser.add_argument("--qa-records", type=int, default=None,
                        help="train on the first N of the demo's fictional QA training records (default: all)")
    parser.add_argument("--prompts", choices=["all", "text"], default="all",
                        help="rows that prompt rollouts (kvroute train --seq-ul-prompts): all, or running text only")
    parser.add_argument("--first-year", type=int, default=1990,
                        help="train on SOTU from this year to 2006 (more years: a larger share of text in the mix)")
    parser.add_argument("--routing", default=None,
                        help="train with this policy instead of plan:PLANS, e.g. a mix with R-CLA "
                             "(mix:rcla:p=0.6,sources=plan|plan:every:2+every:4): its plan: parts' passes roll out, "
                             "and those plans are scored")
    parser.add_argument("--score-plans", default=None,
                        help="the shared plans to score (default: the plans --routing draws), e.g. every:2,every:3,every:4 "
                             "to see that a mix still serves a plan it never named (calibrate that plan first)")
    parser.add_argument("--pair-maps", action="store_true",
                        help="train the start's pairwise maps with the routes (kvroute train --pair-maps)")
    parser.add_argument("--qa", default=None,
                        help="test QA records to score (default: the demo's data/fictional/test.jsonl), e.g. "
                             "runs/qa_under_sharing/data/test.jsonl with --questions 32")
    parser.add_argument("--questions", type=int, default=16, help="test questions scored")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    if args.qa_records is not None and (args.qa_records < 1 or args.text_only):
        parser.error("--qa-records takes N >= 1 QA records to mix in, and no --text-only")
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", PlanMismatchWarning)
    routing = args.routing or "plan:" + "+".join(args.plans.split(","))
    plans = list(policy_from_spec(routing).drawn_plans)  # "every:2,3*every:4": every:4 drawn 3 times as often
    name = args.name or (f"train-ul{args.weight:g}-steps{args.steps}-lr{args.lr:g}-seed{args.seed}"
                         + ("-text" if args.text_only else "") + ("-textprompts" if args.prompts == "text" else "")
                         + (f"-qa{args.qa_records}" if args.qa_records is not None else "")
                         + (f"-sd{args.seq_distill:g}{args.teacher}" if args.seq_distill else "")
                         + (f"-d{args.distill:g}{args.teacher}" if args.distill else "")
                         + (f"-sotu{args.first_year}" if args.first_year != 1990 else "")
                         + (f"-p{args.prefix}c{args.continuation}" if (args.prefix, args.continuation) != (32, 48) else "")
                         + (f"-x{args.per_row}" if args.per_row != 1 else "")
                         # other plans, another run: a finished run of the name is scored, not retrained
                         + ("-" + args.plans.replace(":", "").replace(",", "-").replace("*", "x")
                            if args.plans != "every:2,every:4" else "")
                         + ("-" + slug(args.routing)
                            if args.routing else ""))
    out = ROOT / "runs" / "seq_unlikelihood" / name
    demo = Path(args.demo)

    start, train_s = time.perf_counter(), None
    final = out / "final" if args.steps else Path(args.start)  # --steps 0 scores the start as it is
    if not (final / "config.json").is_file():  # a finished run is scored again, not retrained
        qa_train = demo / "data/fictional/train.jsonl"
        if args.qa_records is not None:
            records = qa_train.read_text(encoding="utf-8").splitlines()[:args.qa_records]
            qa_train = out / f"qa-train-{args.qa_records}.jsonl"
            out.mkdir(parents=True, exist_ok=True)
            qa_train.write_text("\n".join(records) + "\n", encoding="utf-8")
        train(TrainConfig(
            model=args.start, output_dir=str(out),
            data=sotu(args.first_year, 2006) + ([] if args.text_only else [str(qa_train)]),
            routing=routing, seq_unlikelihood=args.weight, seq_distill=args.seq_distill, distill=args.distill,
            distill_from=args.teacher,
            seq_ul_prefix=args.prefix, seq_ul_prompts=args.prompts, seq_ul_per_row=args.per_row,
            seq_ul_length=args.continuation, seq_ul_ngram=args.ngram, seq_len=args.seq_len, batch_size=args.batch,
            max_steps=args.steps, lr=args.lr, warmup=0.0, schedule="constant", weight_decay=0.0, seed=args.seed,
            device="cpu", eval_every=0, save_every=20, quiet=True, pair_maps=args.pair_maps))
        train_s = round(time.perf_counter() - start, 1)
    tokenizer = load_tokenizer(final)

    scored = ["full", *(parse_plan_list(args.score_plans) if args.score_plans else plans)]
    qa_file = args.qa or str(demo / "data/fictional/test.jsonl")
    questions = len(read_qa([qa_file], limit=args.questions, flag="--qa"))  # fewer when the file holds fewer
    writer = evaluate(EvalConfig(checkpoints=[str(final)], plans=",".join(scored), out=str(out / "eval"),
                                 text=[str(demo / "data/sotu-2007-2021")], window=256, stride=256, max_tokens=4096,
                                 qa=[qa_file], limit=args.questions, max_new_tokens=16),
                      progress=False)
    texts = prompts(8, 12)
    rows = []
    for plan in scored:
        scores = {r["metric"]: round(r["value"], 4) for r in writer.rows
                  if r["plan"] == plan and r["metric"] in ("perplexity", "f1", "exact_match")}
        model = load(final, plan=plan)
        d2 = [generate(model, tokenizer, t, max_new_tokens=64).distinct2 for t in texts]
        sample = generate(model, tokenizer, texts[0], max_new_tokens=64).text
        begin = Path(args.start)
        row = {"run": name, "loop": "kvroute train", "seed": args.seed, "qa_in_training": not args.text_only,
               "qa_records": args.qa_records,
               "routing": routing, "rollout_prompts": args.prompts, "sotu_years": [args.first_year, 2006],
               "start": str(begin.relative_to(ROOT)) if begin.is_relative_to(ROOT) else args.start,
               "steps": args.steps, "pair_maps": args.pair_maps, "batch": args.batch, "prefix": args.prefix, "continuation": args.continuation, "per_row": args.per_row, "lr": args.lr, "weight": args.weight,
               "seq_distill": args.seq_distill, "distill": args.distill,
               "teacher": args.teacher if args.seq_distill or args.distill else None,
               "seq_distill_tokens": "to the first repeat" if args.seq_distill else None, "ngram": args.ngram,
               "train_seconds": train_s, "threads": args.threads, "plan": plan, **scores,
               "qa_file": qa_file, "questions": questions,
               "distinct2_mean_8_prompts": round(statistics.mean(d2), 3),
               "share_at_least_0.5": round(sum(d >= 0.5 for d in d2) / len(d2), 3),
               "distinct2": [round(d, 3) for d in d2], "sample": texts[0] + sample}
        print(json.dumps(row), flush=True)
        rows.append(row)
    append_rows(RESULTS, rows)


if __name__ == "__main__":
    main()
