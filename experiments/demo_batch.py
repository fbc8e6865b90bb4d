"""The demo's R-CLA pairs mix with fewer rows per step and more steps, at the same tokens (issue 15).

The mix that met every issue-15 target on three seeds ran 240 steps of 4 x 256 tokens; the demo
affords 120. This runs the demo's own recipe (``scripts/demo.py``: ``RCLA``, lr, schedule, data
SOTU 1990-2006 + the demo's fictional QA training records, from the demo's pairwise maps of the
untrained model) with ``--batch`` rows a step for ``--steps`` steps, so that 240 steps of 2 rows
cost about what 120 of 4 do, and asks whether the number of updates or the number of tokens is
what the quality follows. The text stage and the scoring are ``seq_unlikelihood.py``'s (its
``--batch`` sets the text stage's rows), as for the three-seed tables of docs/RESULTS.md:

    .venv/bin/python experiments/demo_batch.py --batch 2 --steps 240 --seed 1 --threads 1
    .venv/bin/python experiments/seq_unlikelihood.py --start runs/demo_batch/mix-b2-s240-seed1/final \\
        --pair-maps --steps 80 --batch 2 --threads 1 --text-only \\
        --routing "mix:rcla:p=0.6,sources=plan|3*plan:every:2+2*every:4" \\
        --qa runs/qa_under_sharing/data/test.jsonl --questions 32 --score-plans every:2,every:3,every:4 \\
        --name demo-b2-mix240-sul80-start1

(the text stage at seed 0, as the demo's; the runs of docs/RESULTS.md passed ``--demo runs/demo-fast`` to both)

``--needle N`` puts the facts of the first N fictional training records inside real text
(``kvroute.data.needle.needle_records(..., split="train")``, as ``kvroute data needle-qa`` makes test
records: each record's context paragraph at a random sentence boundary of ``--needle-words`` words of
SOTU 1990-2006) and keeps the other records as they are, so the mix sees the same facts, N of them in
a longer context. A record longer than the 256-token rows loses the end of its context (at 80 words,
1 of 1000 lost its fact). ``--text-steps S`` then
runs the demo's text stage (``demo.TEXT_STAGE``, SOTU 1990-2006 alone, seed 0) into ``.../text``:

    .venv/bin/python experiments/demo_batch.py --needle 1000 --text-steps 80 --threads 2 --demo runs/demo-c

Needs a finished ``make demo`` folder (``--demo``, default runs/demo) for its pairwise maps and
QA records. Writes runs/demo_batch/mix-bB-sS-seedN; a finished run is not trained again.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import demo  # noqa: E402  (scripts/demo.py: the recipe and its data split)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="rows of 256 tokens per step")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--demo", default=str(ROOT / "runs" / "demo"), help="a finished `make demo` folder")
    parser.add_argument("--needle", type=int, default=0, help="QA training records whose facts go inside real text")
    parser.add_argument("--needle-words", type=int, default=80, help="words of real text around each of those")
    parser.add_argument("--text-steps", type=int, default=0, help="then the demo's text stage for this many steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    demo_dir = Path(args.demo)
    start, qa = demo_dir / "base-pairs", demo_dir / "data" / "fictional" / "train.jsonl"
    for need in (start, qa):
        if not need.exists():
            sys.exit(f"demo_batch: {need} is missing; run `make demo` (or pass --demo)")
    calib = demo.calibration_text(demo.split_sotu()[0])
    out = ROOT / "runs" / "demo_batch" / f"mix-b{args.batch}-s{args.steps}-seed{args.seed}"
    if args.needle:
        out = out.with_name(f"{out.name}-needle{args.needle}w{args.needle_words}")
        qa = needle_mix(qa, calib, args.needle, args.needle_words, out / "data")
    if not (out / "final" / "config.json").is_file():
        train_mix(start, calib + [str(qa)], out, args)
    else:
        print(f"demo_batch: {out}/final is there")
    if args.text_steps and not (out / "text" / "final" / "config.json").is_file():
        began = time.perf_counter()
        text_stage(out / "final", calib, out / "text", args.text_steps, args.batch)
        print(f"demo_batch: {out}/text/final in {(time.perf_counter() - began) / 60:.1f} min")


def text_stage(start: Path, data: list[str], out: Path, steps: int, batch: int, seed: int = 0, **recipe) -> None:
    """The demo's text stage (``demo.TEXT_STAGE``, ``recipe`` overriding it) from ``start`` into ``out`` (the demo's
    seed 0 by default); a stopped run resumes from its last checkpoint."""
    from kvroute.train import TrainConfig, train

    train(TrainConfig(model=str(start), data=data, output_dir=str(out), seq_len=256, batch_size=batch,
                      max_steps=steps, seed=seed, device="cpu", eval_every=0, save_every=max(steps // 2, 1), quiet=True,
                      resume="latest" if (out / "checkpoints").is_dir() else None, **{**demo.TEXT_STAGE, **recipe}))


def needle_mix(qa: Path, calib: list[str], n: int, words: int, folder: Path) -> Path:
    """The demo's QA training records with the first ``n`` facts placed inside ``words`` words of ``calib`` text."""
    import json

    from kvroute.data.fictional import write_jsonl
    from kvroute.data.needle import needle_records
    from kvroute.data.text import read_texts

    target = folder / f"qa-needle{n}w{words}.jsonl"
    if target.is_file():
        return target
    records = [json.loads(line) for line in qa.read_text().splitlines()]
    if n > len(records):
        sys.exit(f"demo_batch: --needle {n} is more than the {len(records)} QA records of {qa}")
    needles = needle_records(read_texts(calib), n, words, seed=0, split="train")
    if [r["context"] for r in records[:n]] != [r["fact"] for r in needles]:
        sys.exit(f"demo_batch: {qa} is not the fictional train split of seed 0 that --needle expects")
    return write_jsonl(needles + records[n:], target)


def train_mix(start: Path, data: list[str], out: Path, args) -> None:
    from kvroute.train import TrainConfig, train

    config = TrainConfig(model=str(start), data=data, output_dir=str(out), seq_len=256,
                         batch_size=args.batch, max_steps=args.steps, lr=demo.LR, warmup=0.05, schedule="cosine",
                         seed=args.seed, device="cpu", eval_every=0, save_every=max(args.steps // 4, 1), quiet=True,
                         resume="latest" if (out / "checkpoints").is_dir() else None, **demo.RCLA)
    began = time.perf_counter()
    train(config)
    print(f"demo_batch: {out}/final in {(time.perf_counter() - began) / 60:.1f} min")


if __name__ == "__main__":
    main()
