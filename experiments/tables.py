"""Print the markdown tables of docs/results_pretrain_ablation.md from the result JSONs.

    .venv/bin/python experiments/tables.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402

PLANS = ["full", "every:2", "every:4", "every:8"]


def _cell(table: dict, plan: str, key: str) -> str:
    return f"{table[plan][key]:.3f}" if plan in table else "–"


def table(results: dict, key: str, label=lambda n, r: n, ref: str | None = None) -> str:
    lines = ["| model | layers | " + " | ".join(f"{p}" for p in PLANS) + " | train wall s |",
             "|---|---|" + "---|" * len(PLANS) + "---|"]
    for name, r in results["runs"].items():
        cells = [_cell(r["loss"], p, key) for p in PLANS]
        lines.append(f"| {label(name, r)} | {r['layers']} | " + " | ".join(cells) + f" | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def same_cache(results: dict, key: str = "mean") -> str:
    """The 8-layer models under shared plans against the shallow standard models, by KV size (seed 0)."""
    runs = results["runs"]
    shallow = [n for n in ("pt_std_L4", "pt_std_L2") if n in runs]
    deep = [n for n in ("pt_p0.75", "pt_p0.50", "pt_p0.25", "pt_p1.00") if n in runs]
    heads = [f"standard {runs[n]['layers']} layers" for n in shallow]
    heads += [f"R-CLA p={runs[n]['p']}" if runs[n]["p"] is not None else "standard 8 layers, shared" for n in deep]
    lines = ["| KV KiB/token | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for plan in PLANS[1:]:
        kib = next((runs[n]["loss"][plan]["kv_kib_per_token"] for n in deep if plan in runs[n]["loss"]), None)
        if kib is None:
            continue
        cells = [f"{runs[n]['loss']['full'][key]:.3f}" if runs[n]["loss"]["full"]["kv_kib_per_token"] == kib else ""
                 for n in shallow]
        cells += [_cell(runs[n]["loss"], plan, key) for n in deep]
        lines.append(f"| {kib:g} ({plan}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_table(results: dict) -> str:
    """The |S| = L/2 comparison over seeds (``half_cache_seeds`` of pretrain.json), mean held-out loss."""
    stats = results.get("half_cache_seeds", {})
    models = stats.get("models", {})
    kib = ", ".join(sorted({f"{m['kv_kib_per_token']:g}" for m in models.values()}))
    lines = [f"| model ({kib} KiB/token of KV) | seeds | per seed | mean | std | std. error |",
             "|---|---|---|---|---|---|"]
    for m in models.values():
        std = "–" if m["std"] is None else f"{m['std']:.3f}"
        se = "–" if m["se"] is None else f"{m['se']:.3f}"
        lines.append(f"| {m['label']} | {len(m['values'])} | {' / '.join(f'{v:.3f}' for v in m['values'])} | "
                     f"{m['mean']:.3f} | {std} | {se} |")
    for stem, d in stats.get("minus_L4", {}).items():
        lines.append(f"\n{models[stem]['label']} minus standard 4 layers: {d['diff']:+.3f} +- {d['se']:.3f} nats "
                     f"(Welch t = {d['welch_t']:.2f}); R-CLA lower in {d['pairs_rcla_lower']} of {d['pairs']} "
                     "seed pairs")
    return "\n".join(lines)


def milestones(results: dict) -> str:
    """How fast each run's training loss fell (runs whose train.csv was there when they were collected)."""
    rows = [(n, r) for n, r in results["runs"].items() if r.get("steps_to_train_loss")]
    if not rows:
        return ""
    keys = list(rows[0][1]["steps_to_train_loss"])
    lines = ["| run | layers | seed | " + " | ".join(f"train loss < {k}" for k in keys) + " |",
             "|---|---|---|" + "---|" * len(keys)]
    for n, r in rows:
        cells = ["never" if r["steps_to_train_loss"][k] is None else str(r["steps_to_train_loss"][k]) for k in keys]
        lines.append(f"| {n} | {r['layers']} | {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def budgets(key: str = "mean") -> str:
    """Each run at the measured budgets side by side (``<exp>_512k.json`` is the earlier, smaller one)."""
    lines = ["| experiment | run | budget | full | every:2 | every:4 | every:8 |", "|---|---|---|---|---|---|---|"]
    for exp in ("pretrain", "ablation"):
        for suffix in ("_512k", ""):
            path = c.RESULTS / f"{exp}{suffix}.json"
            if not path.is_file():
                continue
            results = json.loads(path.read_text())
            for name, r in results["runs"].items():
                if exp == "ablation" and name.startswith("pt_"):
                    continue  # shown under pretrain
                cells = [_cell(r["loss"], p, key) for p in PLANS]
                lines.append(f"| {exp} | {name} | {r['tokens']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _label(name: str, run: dict) -> str:
    return run.get("label", name)


def main() -> None:
    for exp in ("pretrain", "ablation"):
        path = c.RESULTS / f"{exp}.json"
        if not path.is_file():
            print(f"## {exp}: no results yet\n")
            continue
        results = json.loads(path.read_text())
        for key in ("mean", *c.HELDOUT):
            print(f"## {exp}: held-out loss ({key})\n")
            print(table(results, key, _label))
            print()
        runs = results["runs"]
        if exp == "pretrain" and "pt_p1.00" in runs:
            base = runs["pt_p1.00"]["loss"]["full"]["mean"]
            print("relative to p=1.0 at full cache (mean):")
            for n, r in runs.items():
                for p in PLANS:
                    if p in r["loss"]:
                        print(f"  {n} {p} ({r['loss'][p]['kv_kib_per_token']} KiB/tok): "
                              f"{100 * (r['loss'][p]['mean'] / base - 1):+.2f}%")
            print()
            print("same cache: the 8-layer models shared against shallow standard models (mean):\n")
            print(same_cache(results))
            print()
            print("the same comparison over seeds:\n")
            print(seed_table(results))
            print()
            print("first step at which the train loss (mean of 5 logged steps) fell below:\n")
            print(milestones(results))
            print()
    print("## every run at every measured budget (mean)\n")
    print(budgets())


if __name__ == "__main__":
    main()
