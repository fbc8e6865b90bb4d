"""Context QA and greedy text under shared plans, on many fresh questions and prompts (issue 15).

The QA scores behind the demo's recipe (docs/RESULTS.md) come from the first 32 questions of the
fictional test split, the questions every recipe choice was made on. With 32 questions, one run's
every:2 / full F1 ratio moves by about a tenth when a few answers change, and several runs sat near
the 0.5x target. This scores finished checkpoints again on the next 256 questions of the same
test split (records 32-287 of ``kvroute data fictional-qa``'s seed 0: entity-disjoint from every
training record, and never looked at before), under the same settings as
``seq_unlikelihood.py`` (fp32, greedy, 16 new tokens, 8 prompts at a time), and reports each
plan's F1, its ratio to the full cache's with a paired bootstrap 95% interval over questions,
and F1 by entity kind.

With ``--text`` it scores the greedy text alike: 64 greedy tokens (fp32, through the plan's cache)
after each of 75 fresh held-out prompts, five per speech of 2007-2021 (16 tokens from the
sentence starts nearest 10%, 20%, 35%, 65% and 80% of the speech; the eight prompts of
``greedy_loops.py`` start near 50%), and reports distinct-2 over them (the mean, the share of
prompts at 0.5 or more, and a bootstrap 95% interval of the mean), each row cut at its first EOS.

    .venv/bin/python experiments/qa_wide.py --runs demo-b2 b2-80-start1 ...   # names below; default: all
    .venv/bin/python experiments/qa_wide.py --text --runs demo-b2 ...                 # the greedy text
    .venv/bin/python experiments/qa_wide.py --list

With ``--needle sotu|moby`` it scores a second QA domain: ``kvroute data needle-qa``'s records
(seed 1: fictional test facts never looked at, each placed at a random sentence boundary inside
250 words of held-out State of the Union 2007-2021 or Moby Dick), so the answer comes back from
a context about six times longer, at any depth. Rows add F1 by the fact's depth in the passage.

    .venv/bin/python experiments/qa_wide.py --needle sotu --questions 128 --precision bf16 --runs demo-b2 ...

Appends to experiments/results/qa_wide.json; a plan already scored for a run on the same questions is skipped.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from kvroute.data.fictional import generate, write_jsonl  # noqa: E402
from kvroute.data.needle import needle_records  # noqa: E402
from kvroute.data.text import read_texts  # noqa: E402
from kvroute.evaluate import EvalConfig, continuation_score, evaluate  # noqa: E402
from kvroute.models import load, load_tokenizer  # noqa: E402
from kvroute.plan import parse_plan_list  # noqa: E402
from common import MOBY, append_rows, slug, sotu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "qa_wide.json"
OUT = ROOT / "runs" / "qa_wide"
SU = "runs/seq_unlikelihood"
DEFAULT_PLANS = "full,every:2,every:4"

#: the demo's recipe (2 x (240 + 80) steps) and the variants docs/RESULTS.md compares it with
RUNS = {
    "demo-b2": "runs/demo-b2/rcla-mix-text/final",
    # the demo's text stage run again at 60 steps of 4 rows (scripts/demo.py with those two settings), set aside
    "demo-b2-60b4": "runs/demo-b2-60b4text/rcla-mix-text/final",
    **{f"b2-80-start{s}": f"{SU}/demo-b2-mix240-sul80-start{s}/final" for s in (1, 2, 3)},
    "b2-80-start1-seed1": f"{SU}/demo-b2-mix240-sul80-start1-seed1/final",
    **{f"b2-120-start{s}": f"{SU}/demo-b2-mix240-sul120-start{s}/final" for s in (1, 2, 3)},
    **{f"b2-80e4x3-start{s}": f"{SU}/demo-b2-mix240-sul80e4x3-start{s}/final" for s in (1, 2, 3)},
    **{f"b2-40b4-start{s}": f"{SU}/demo-b2-mix240-sul40b4-start{s}/final" for s in (1, 2)},
    **{f"b2-60b4-start{s}": f"{SU}/demo-b2-mix240-sul60b4-start{s}/final" for s in (1, 2, 3)},
    "demo-b2-mix": "runs/demo-b2/rcla-mix/final",
    # the demo's references, calibrated for every:2 and every:4 (their full plan is the model's own)
    "demo-b2-base-cal": "runs/demo-b2/base-cal",
    "demo-b2-standard-cal": "runs/demo-b2/standard-cal",
    # the demo from scratch at stop 48 (its recipe unchanged)
    "demo-c": "runs/demo-c/rcla-mix-text/final",
    "demo-c-standard-cal": "runs/demo-c/standard-cal",
    # the demo's recipe with the facts of 1000 of its 2000 QA training records inside 80 words of SOTU 1990-2006
    # (experiments/demo_batch.py --needle 1000 --text-steps 80 --threads 2 --demo runs/demo-c)
    "needle1000": "runs/demo_batch/mix-b2-s240-seed0-needle1000w80/text/final",
    **{f"mix-b2-seed{s}": f"runs/demo_batch/mix-b2-s240-seed{s}/final" for s in (1, 2, 3)},
    # the demo's text stage naming the 50% plan searched on needle answers in place of every:2
    # (experiments/needle_plan_search.py --run demo-c --owners 15 --text-stage 80 --start runs/demo-c/rcla-mix/final)
    "demo-c-needleplan-text": "runs/needle_plan_search/demo-c-15-text/final",
    # the same from mix seed 1, searched before its text stage (--run mix-b2-seed1 ... --start runs/demo_batch/...)
    "mix-b2-seed1-needleplan-text": "runs/needle_plan_search/mix-b2-seed1-15-text/final",
    # the demo's text stage naming the 25% layout searched on fictional QA answers in place of every:4
    # (kvroute plan search runs/demo-c/rcla-mix/final --budget 8 --qa ...; docs/RESULTS.md, stop 49)
    "demo-c-qa8-text": "runs/plan_search_qa/demo-c-qa8-text/final",
}


def questions(skip: int, n: int) -> Path:
    """Records ``skip .. skip + n - 1`` of the fictional test split (seed 0), as a JSONL file."""
    path = OUT / f"test-{skip}-{skip + n}.jsonl"
    if not path.is_file():
        write_jsonl(generate(skip + n, "test", seed=0)[skip:], path)
    return path


def needle_questions(domain: str, n: int, words: int = 250, seed: int = 1) -> Path:
    """``n`` needle-QA records (``kvroute data needle-qa``) in held-out ``domain`` text, as a JSONL file."""
    path = OUT / f"needle-{domain}-{words}w-s{seed}-{n}.jsonl"
    if not path.is_file():
        texts = read_texts(sotu(2007, 2021) if domain == "sotu" else [MOBY])
        write_jsonl(needle_records(texts, n, words, seed), path)
    return path


def bootstrap_interval(values: list[float], reference: list[float] | None = None, draws: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Bootstrap 95% interval of mean(values), or with ``reference`` (paired, same examples) of
    mean(values) / mean(reference), resampling the examples."""
    reference = reference or [1.0] * len(values)
    rng, n, stats = random.Random(seed), len(values), []
    for _ in range(draws):
        idx = [rng.randrange(n) for _ in range(n)]
        base = sum(reference[i] for i in idx)
        if base > 0:
            stats.append(sum(values[i] for i in idx) / base)
    stats.sort()
    return stats[int(0.025 * len(stats))], stats[int(0.975 * len(stats)) - 1]


def score(name: str, checkpoint: str, qa: Path, plans: str, precision: str = "fp32") -> list[dict]:
    # a folder per plan set: scoring one more plan later keeps the earlier predictions
    out = OUT / name / (qa.stem if qa.name.startswith("needle") else "")
    out = out if plans == DEFAULT_PLANS else out / slug(plans)
    start = time.perf_counter()
    evaluate(EvalConfig(checkpoints=[str(ROOT / checkpoint)], plans=plans, out=str(out), qa=[str(qa)],
                        max_new_tokens=16, precision=precision), progress=False)
    seconds = round(time.perf_counter() - start, 1)
    records = list(map(json.loads, qa.read_text().splitlines()))
    kinds = {r["id"]: r["kind"] for r in records}
    # needle QA: where the fact sat in its passage, in quarters
    depths = {r["id"]: min(3, int(r["depth"] * 4)) for r in records if "depth" in r}
    by_plan: dict[str, dict[str, float]] = {}
    for line in (out / "predictions.jsonl").read_text().splitlines():
        p = json.loads(line)
        by_plan.setdefault(p["plan"], {})[p["id"]] = p["f1"]
    ids = sorted(by_plan["full"])
    full = [by_plan["full"][i] for i in ids]
    rows = []
    for plan, f1s in by_plan.items():
        f1 = [f1s[i] for i in ids]
        low, high = bootstrap_interval(f1, full)
        row = {"run": name, "checkpoint": checkpoint, "task": "qa", "plan": plan, "qa_file": str(qa.relative_to(ROOT)),
               "questions": len(ids), "f1": round(statistics.mean(f1), 4),
               "f1_vs_full": round(statistics.mean(f1) / max(statistics.mean(full), 1e-9), 3),
               "f1_vs_full_95": [round(low, 3), round(high, 3)],
               "f1_by_kind": {k: round(statistics.mean(f1s[i] for i in ids if kinds[i] == k), 3)
                              for k in sorted(set(kinds.values()))},
               "seconds_all_plans": seconds, "threads": torch.get_num_threads(), "precision": precision}
        if depths:
            quarters = [[f1s[i] for i in ids if depths[i] == q] for q in range(4)]
            row["f1_by_depth_quarter"] = [round(statistics.mean(f), 3) if f else None for f in quarters]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


#: where in each held-out speech the prompts start (greedy_loops.py's eight start near 0.5)
PROMPT_AT = (0.10, 0.20, 0.35, 0.65, 0.80)
PROMPT_TOKENS, NEW_TOKENS, BATCH = 16, 64, 25


def text_prompts(tokenizer) -> tuple[list[str], torch.Tensor]:
    """The prompts: ``PROMPT_TOKENS`` tokens from the sentence starts nearest ``PROMPT_AT`` of each speech
    of 2007-2021; returns their texts and ``(N, PROMPT_TOKENS)`` ids."""
    texts, ids = [], []
    for path in sotu(2007, 2021):
        text = " ".join(Path(path).read_text(encoding="utf-8").split())
        starts = [m.end() for m in re.finditer(r"[.!?] (?=[A-Z])", text)]
        for at in PROMPT_AT:
            start = min(starts, key=lambda i: abs(i - int(at * len(text))))
            tokens = tokenizer(text[start:start + 400], add_special_tokens=False)["input_ids"][:PROMPT_TOKENS]
            texts.append(tokenizer.decode(tokens))
            ids.append(tokens)
    return texts, torch.tensor(ids)


def score_text(name: str, checkpoint: str, plans: str) -> list[dict]:
    tokenizer = load_tokenizer(ROOT / checkpoint)
    texts, prompts = text_prompts(tokenizer)
    rows = []
    for plan in parse_plan_list(plans):
        model = load(ROOT / checkpoint, plan=plan).eval()
        start = time.perf_counter()
        _, predictions = continuation_score(model, tokenizer, prompts.tolist(), NEW_TOKENS, BATCH)  # cut at EOS
        d2, samples = [p["distinct2"] for p in predictions], [p["continuation"] for p in predictions]
        low, high = bootstrap_interval(d2)
        row = {"run": name, "checkpoint": checkpoint, "task": "text", "plan": plan, "prompts": len(d2),
               "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS,
               "distinct2_mean": round(statistics.mean(d2), 3), "distinct2_mean_95": [round(low, 3), round(high, 3)],
               "share_at_least_0.5": round(sum(d >= 0.5 for d in d2) / len(d2), 3),
               "distinct2": [round(d, 3) for d in d2], "sample": texts[0] + samples[0],
               "seconds": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads(),
               "precision": "fp32"}
        print(json.dumps({k: v for k, v in row.items() if k != "distinct2"}), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="*", default=list(RUNS), help="names of RUNS (--list shows them)")
    parser.add_argument("--skip", type=int, default=32, help="test records before these (the ones choices were made on)")
    parser.add_argument("--questions", type=int, default=256)
    parser.add_argument("--plans", default=DEFAULT_PLANS)
    parser.add_argument("--text", action="store_true", help="score the greedy text instead of QA")
    parser.add_argument("--needle", choices=["sotu", "moby"], help="score needle QA in this held-out text instead")
    parser.add_argument("--needle-words", type=int, default=250, help="words of real text around each needle fact")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="QA scoring precision")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--list", action="store_true", help="print the runs and their checkpoints")
    args = parser.parse_args()
    if args.list:
        for name, path in RUNS.items():
            print(f"{name:22s} {path}{'' if (ROOT / path).is_dir() else '  (missing)'}")
        return
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; --list shows them")
    torch.set_num_threads(args.threads)
    qa = (None if args.text else needle_questions(args.needle, args.questions, args.needle_words) if args.needle
          else questions(args.skip, args.questions))
    task = "text" if args.text else str(qa.relative_to(ROOT))
    done = ({(r["run"], r.get("qa_file", r.get("task")), r["plan"]) for r in json.loads(RESULTS.read_text())}
            if RESULTS.is_file() else set())
    for name in args.runs:
        todo = [p for p in parse_plan_list(args.plans) if (name, task, p) not in done]
        if not todo:
            print(f"{name}: already scored ({task})")
            continue
        if not (ROOT / RUNS[name]).is_dir():
            print(f"{name}: {RUNS[name]} missing, skipped")
            continue
        plans = ",".join(todo if args.text else dict.fromkeys(["full", *todo]))  # QA ratios need full's answers
        rows = (score_text(name, RUNS[name], plans) if args.text
                else score(name, RUNS[name], qa, plans, args.precision))
        append_rows(RESULTS, [r for r in rows if r["plan"] in todo])  # a plan already scored keeps its row


if __name__ == "__main__":
    main()
