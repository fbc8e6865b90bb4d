"""Sequence-level unlikelihood under the plans (Welleck et al., 2019): does it stop greedy loops? (issue 15)

Token-level unlikelihood (``kvroute train --unlikelihood``) trains on reference text, where the
model seldom repeats itself, and left the loops under shared plans where they were. The
sequence-level form trains on the model's own greedy continuations: each step draws one of the
plans, lets the model continue ``--batch`` prefixes of training text greedily under it (through the
plan's shared cache, calibrated), and pushes down every token of the continuation that is part of
a repeated n-gram (``-log(1 - p)``), next to the LM loss on training text under the same plan.

Starts from a checkpoint trained for the plans (default: the two-plan model of
``one_plan_demo.py --variants plans2-steps120``), trains ``--steps`` steps (AdamW, constant lr), and
scores what ``one_plan_demo.py`` scores, plus distinct-2 over ``greedy_loops.py``'s eight held-out
prompts. Prefixes and LM text come from SOTU 1990-2006, never from the held-out years. Appends to
experiments/results/seq_unlikelihood.json.

    make demo
    .venv/bin/python experiments/one_plan_demo.py --variants plans2-steps120
    .venv/bin/python experiments/seq_unlikelihood.py --steps 40
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

import kvroute  # noqa: E402
from kvroute.evaluate import EvalConfig, evaluate  # noqa: E402
from kvroute.generate import generate  # noqa: E402
from kvroute.hf.patch import PlanMismatchWarning  # noqa: E402
from kvroute.models import load, load_tokenizer  # noqa: E402
from kvroute.train.losses import causal_lm_loss  # noqa: E402
from common import append_rows, sotu  # noqa: E402
from greedy_loops import prompts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "seq_unlikelihood.json"


def repeated_ngram_mask(ids: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """(B, T) bool: tokens at positions >= ``start`` that belong to an n-gram seen earlier in the row."""
    batch, length = ids.shape
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        row = ids[b].tolist()
        seen: set[tuple[int, ...]] = set()
        for i in range(length - n + 1):
            gram = tuple(row[i:i + n])
            if gram in seen and i + n > start:
                mask[b, max(i, start):i + n] = True
            seen.add(gram)
    return mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default=str(ROOT / "runs" / "demo"), help="a finished `make demo` folder")
    parser.add_argument("--start", default=str(ROOT / "runs" / "one_plan_demo" / "plans2-steps120" / "final"))
    parser.add_argument("--plans", default="every:2,every:4")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight", type=float, default=1.0, help="weight of the sequence-level unlikelihood")
    parser.add_argument("--batch", type=int, default=4, help="continuations and LM rows per step")
    parser.add_argument("--prefix", type=int, default=32)
    parser.add_argument("--continuation", type=int, default=48)
    parser.add_argument("--ngram", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    warnings.simplefilter("ignore", PlanMismatchWarning)
    plans = args.plans.split(",")
    name = args.name or f"seq-ul{args.weight:g}-steps{args.steps}-lr{args.lr:g}"
    out = ROOT / "runs" / "seq_unlikelihood" / name
    demo = Path(args.demo)

    tokenizer = load_tokenizer(args.start)
    text = " ".join(Path(f).read_text(encoding="utf-8") for f in sotu(1990, 2006))
    ids = torch.tensor(tokenizer(text)["input_ids"])
    rows_of_text = ids[: len(ids) // args.seq_len * args.seq_len].view(-1, args.seq_len)
    print(f"{len(ids)} training tokens, {len(rows_of_text)} rows of {args.seq_len}", flush=True)

    model = load(args.start, plan=plans[0])
    model.eval()  # the plan routes every pass; the maps stay buffers; gradients still flow
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    log = []
    for step in range(1, args.steps + 1):
        plan = plans[int(torch.randint(len(plans), (1,), generator=g))]
        kvroute.set_plan(model, plan)
        picks = torch.randint(len(rows_of_text), (args.batch,), generator=g)
        offset = int(torch.randint(args.seq_len - args.prefix, (1,), generator=g))
        prefix = rows_of_text[picks, offset:offset + args.prefix]
        with torch.no_grad():
            seqs = model.generate(prefix, attention_mask=torch.ones_like(prefix), max_new_tokens=args.continuation,
                                  do_sample=False, pad_token_id=tokenizer.eos_token_id)
        mask = repeated_ngram_mask(seqs, args.prefix, args.ngram)  # (B, T) tokens to push down
        logits = model(input_ids=seqs, use_cache=False).logits
        logp = logits[:, :-1].float().log_softmax(-1).gather(-1, seqs[:, 1:, None])[..., 0]  # (B, T-1)
        target_mask = mask[:, 1:]
        pushed = -torch.log1p(-logp.exp().clamp(max=1 - 1e-5))
        ul = (pushed * target_mask).sum() / (args.batch * args.continuation)
        lm_rows = rows_of_text[torch.randint(len(rows_of_text), (args.batch,), generator=g)]
        lm = causal_lm_loss(model(input_ids=lm_rows, use_cache=False).logits, lm_rows)
        loss = lm + args.weight * ul
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        share = float(target_mask.float().mean())
        log.append({"step": step, "plan": plan, "lm": round(lm.item(), 4), "ul": round(ul.item(), 4),
                    "repeated_share": round(share, 4)})
        print(json.dumps(log[-1]), f"{time.perf_counter() - start:.0f}s", flush=True)
    train_s = time.perf_counter() - start
    kvroute.set_plan(model, plans[0])
    kvroute.save_checkpoint(model, out / "final", tokenizer)
    (out / "log.json").write_text(json.dumps(log, indent=1))

    scored = ["full", *plans]
    writer = evaluate(EvalConfig(checkpoints=[str(out / "final")], plans=",".join(scored), out=str(out / "eval"),
                                 text=[str(demo / "data/sotu-2007-2021")], window=256, stride=256, max_tokens=4096,
                                 qa=[str(demo / "data/fictional/test.jsonl")], limit=16, max_new_tokens=16),
                      progress=False)
    texts = prompts(8, 12)
    rows = []
    for plan in scored:
        scores = {r["metric"]: round(r["value"], 4) for r in writer.rows
                  if r["plan"] == plan and r["metric"] in ("perplexity", "f1", "exact_match")}
        model = load(out / "final", plan=plan)
        d2 = [generate(model, tokenizer, t, max_new_tokens=64).distinct2 for t in texts]
        sample = generate(model, tokenizer, texts[0], max_new_tokens=64).text
        row = {"run": name, "start": str(Path(args.start).relative_to(ROOT)) if Path(args.start).is_relative_to(ROOT)
               else args.start, "steps": args.steps, "lr": args.lr, "weight": args.weight, "ngram": args.ngram,
               "train_seconds": round(train_s, 1), "threads": args.threads, "plan": plan, **scores,
               "distinct2_mean_8_prompts": round(statistics.mean(d2), 3),
               "share_at_least_0.5": round(sum(d >= 0.5 for d in d2) / len(d2), 3),
               "distinct2": [round(d, 3) for d in d2], "sample": texts[0] + sample}
        print(json.dumps(row), flush=True)
        rows.append(row)
    append_rows(RESULTS, rows)


if __name__ == "__main__":
    main()
