"""kvroute data: build datasets (fictional context-QA)."""

from __future__ import annotations

import argparse

NAME = "data"
HELP = "Build datasets: `kvroute data fictional-qa --out DIR --train N --test M --seed S`."


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    qa = sub.add_parser("fictional-qa", help="RepLiQA-like QA about invented entities (train/test entity-disjoint)")
    qa.add_argument("--out", required=True, help="folder for train.jsonl and test.jsonl")
    qa.add_argument("--train", type=int, default=2000, help="training records (default: 2000)")
    qa.add_argument("--test", type=int, default=200, help="test records (default: 200)")
    qa.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from kvroute.data.fictional import write_fictional_qa

    paths = write_fictional_qa(args.out, train=args.train, test=args.test, seed=args.seed)
    print(f"wrote {paths['train']} ({args.train} records) and {paths['test']} ({args.test} records)")
    return 0
