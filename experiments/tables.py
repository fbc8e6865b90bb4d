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


def main() -> None:
    for exp in ("pretrain", "ablation"):
        path = c.RESULTS / f"{exp}.json"
        if not path.is_file():
            print(f"## {exp}: no results yet\n")
            continue
        results = json.loads(path.read_text())
        label = (lambda n, r: r.get("label", n))
        for key in ("mean", *c.HELDOUT):
            print(f"## {exp}: held-out loss ({key})\n")
            print(table(results, key, label))
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


if __name__ == "__main__":
    main()
