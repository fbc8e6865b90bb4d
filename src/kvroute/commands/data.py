"""kvroute data: build datasets (fictional context-QA, and the same facts buried in real text)."""

from __future__ import annotations

import argparse

NAME = "data"
HELP = ("Build datasets: `kvroute data fictional-qa --out DIR --train N --test M --seed S`, "
        "`kvroute data needle-qa --text SRC --out FILE --n N --words W`.")


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    qa = sub.add_parser("fictional-qa", help="RepLiQA-like QA about invented entities (train/test entity-disjoint)")
    qa.add_argument("--out", required=True, help="folder for train.jsonl and test.jsonl")
    qa.add_argument("--train", type=int, default=2000, help="training records (default: 2000)")
    qa.add_argument("--test", type=int, default=200, help="test records (default: 200)")
    qa.add_argument("--seed", type=int, default=0)
    needle = sub.add_parser("needle-qa", help="fictional facts placed inside passages of real text "
                                              "(context QA over a long context; kvroute.data.needle)")
    needle.add_argument("--text", action="append", required=True, metavar="PATH",
                        help="held-out real text: a file, a folder or a quoted glob (repeatable)")
    needle.add_argument("--out", required=True, help="the JSONL file to write")
    needle.add_argument("--n", type=int, default=256, help="records (default: 256)")
    needle.add_argument("--words", type=int, default=250, help="words of real text around each fact (default: 250)")
    needle.add_argument("--seed", type=int, default=0)
    needle.add_argument("--split", choices=("test", "train"), default="test",
                        help="the fictional split the facts come from: test (default) to score, train to train or "
                             "search a plan on (entity-disjoint from test)")


def run(args: argparse.Namespace) -> int:
    from kvroute.data.fictional import write_fictional_qa, write_jsonl

    if args.dataset == "needle-qa":
        from kvroute.data.needle import needle_records
        from kvroute.data.text import read_texts

        records = needle_records(read_texts(args.text, "--text"), args.n, args.words, args.seed, args.split)
        print(f"wrote {write_jsonl(records, args.out)} ({len(records)} records)")
        return 0
    paths = write_fictional_qa(args.out, train=args.train, test=args.test, seed=args.seed)
    print(f"wrote {paths['train']} ({args.train} records) and {paths['test']} ({args.test} records)")
    return 0
