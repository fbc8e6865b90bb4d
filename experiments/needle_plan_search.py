"""Plan search on answers from long contexts: does a 50% layout chosen for retrieval keep needle QA?

Under every:2 the demo's R-CLA recipe keeps 0.57-0.71x of its full-cache F1 on short fictional
contexts but only 0.17-0.43x when the fact sits inside about 400 tokens of real text
(``kvroute data needle-qa``; docs/RESULTS.md, stop 48). Layers are not interchangeable: a layer
that retrieves may need its own keys. This runs ``kvroute plan search --qa``
(:func:`kvroute.search_run.search_checkpoint`): the loss on the answer tokens of needle-QA records
is the objective (the context-first prompt the evaluation uses, every other token unlabelled), on
search records that share nothing with the scored ones:

- search: 16 (``--records``) needle records of the *train* split of the fictional facts
  (entity-disjoint from every scored question), seed 2, inside SOTU 1990-2006;
- scored afterwards by ``qa_wide.py --needle sotu|moby --plans ...``: seed-1 test facts inside
  SOTU 2007-2021 and Moby Dick.

Scoring runs under bf16 autocast (as the needle scoring does). Writes
``experiments/results/needle_plan_search-<run>-<owners>.json``: the plan and its search loss
against full's and the uniform plan's of the budget (every:2 for 15 owners).

    .venv/bin/python experiments/needle_plan_search.py --run demo-c --owners 15 --threads 2

The demo's text stage rolls out every:2 and every:4, so the plans it serves write varied text and
others may loop. ``--text-stage S`` then runs it (``demo.TEXT_STAGE``, S steps of 2 x 256 tokens of
SOTU 1990-2006, seed 0) from ``--start`` (the demo's model before its text stage) with the found
plan in place of every:2, into runs/needle_plan_search/<run>-<owners>-text:

    .venv/bin/python experiments/needle_plan_search.py --run demo-c --owners 15 --threads 2 \\
        --text-stage 80 --start runs/demo-c/rcla-mix/final
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from kvroute.data.needle import needle_records  # noqa: E402
from kvroute.data.fictional import write_jsonl  # noqa: E402
from kvroute.data.text import read_texts  # noqa: E402
from kvroute.search_run import SearchConfig, search_checkpoint  # noqa: E402
from common import sotu, write_json  # noqa: E402
from qa_wide import RUNS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "needle_plan_search"
import demo_batch  # noqa: E402  (the demo's text stage)
from demo_batch import demo  # noqa: E402  (scripts/demo.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="demo-c", help="a name of qa_wide.py's RUNS")
    parser.add_argument("--owners", type=int, default=15)
    parser.add_argument("--records", type=int, default=16)
    parser.add_argument("--shortlist", type=int, default=5)
    parser.add_argument("--refine", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--text-stage", type=int, default=0, help="steps of the demo's text stage naming the plan")
    parser.add_argument("--start", help="the text stage's start: the demo's model before its text stage")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = ROOT / "experiments" / "results" / f"needle_plan_search-{args.run}-{args.owners}.json"
    if not out.is_file():
        search(args, out)
    saved = json.loads(out.read_text())
    if {k: saved.get(k) for k in settings(args)} != settings(args):
        sys.exit(f"needle_plan_search: {out} was searched with other settings; move it aside to search again")
    if args.text_stage:
        text_stage(args, saved["plan"])


def text_stage(args: argparse.Namespace, plan: str) -> None:
    if not args.start:
        sys.exit("needle_plan_search: --text-stage needs --start")
    target = OUT / f"{args.run}-{args.owners}-text"
    if (target / "final" / "config.json").is_file():
        print(f"needle_plan_search: {target}/final is there")
        return
    assert "3*plan:every:2+" in demo.TEXT_STAGE["routing"]
    routing = demo.TEXT_STAGE["routing"].replace("3*plan:every:2+", f"3*plan:{plan}+")
    began = time.perf_counter()
    demo_batch.text_stage(ROOT / args.start, sotu(*demo.CALIB_YEARS), target, args.text_stage, demo.BATCH,
                          routing=routing)
    print(f"needle_plan_search: {target}/final ({routing}) in {(time.perf_counter() - began) / 60:.1f} min")


def search(args: argparse.Namespace, out: Path) -> None:
    """``kvroute plan search --qa`` (:func:`kvroute.search_run.search_checkpoint`) on the search records."""
    checkpoint = RUNS[args.run]
    records = OUT / f"search-sotu1990-2006-train-s2-{args.records}.jsonl"
    if not records.is_file():
        write_jsonl(needle_records(read_texts(sotu(1990, 2006)), args.records, 250, seed=2, split="train"), records)
    start = time.perf_counter()
    run = search_checkpoint(SearchConfig(str(ROOT / checkpoint), str(args.owners), qa=[str(records)], heldout=0.0,
                                         shortlist=args.shortlist, refine=args.refine, precision="bf16"))
    seconds = round(time.perf_counter() - start, 1)
    refs = {row["plan"]: row["loss"] for row in run.result.rows[:-1]}  # full and the uniform plan of the budget
    write_json(out, {"run": args.run, "checkpoint": checkpoint, "owners": args.owners, "plan": run.result.plan.spec,
                     "answer_loss": run.result.loss, "reference_answer_loss": refs, **settings(args),
                     "evaluations": run.result.evaluations, "seconds": seconds, "threads": args.threads,
                     "precision": "bf16"})
    print(json.dumps({"plan": run.result.plan.spec, "loss": run.result.loss, **refs, "seconds": seconds}))


def settings(args: argparse.Namespace) -> dict:
    """What a saved search depends on besides the run and the owners."""
    return {"search_records": args.records, "shortlist": args.shortlist, "refine": args.refine}


if __name__ == "__main__":
    main()
