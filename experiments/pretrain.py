"""Pre-training from scratch with R-CLA (issue 9, section 3; the paper's Table 1 / Figure 5).

A Qwen3-style model (8 layers, hidden 128, 2 KV heads of 32 dims; see common.py) is
trained from scratch on State of the Union 1790-2006 + most of Moby Dick with
p in {1.0 (standard, routing none), 0.75, 0.5, 0.25}, and standard models of 4 and 2
layers (the same cache as the 8-layer model under every:2 / every:4) on the same
tokens, and R-CLA p=0.75 with plan-shaped sources (``--sources plan``). Every model is
scored on held-out text (State of the Union 2007+, Moby Dick chapters 15, 30, ..., 135):
the 8-layer models under full, every:2, every:4, every:8, the shallow ones under full.

Writes experiments/results/pretrain.json, docs/img/pretrain_loss_vs_cache.png and
docs/img/pretrain_half_cache_seeds.png.
Rerunnable: finished runs and evaluations are skipped (outputs in runs/experiments/).

    .venv/bin/python experiments/pretrain.py --jobs 2   # 1,500 steps of 8 x 256 tokens (KVR_STEPS to change)

KVR_NO_SEED_CHECK=1 skips the extra seeds (R-CLA p=0.75 and standard 4 layers: seeds 1-4; standard 8: seed 1).
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402

DEEP_PLANS = ["full", "every:2", "every:4", "every:8"]
#: name -> (routing, p, layers)
RUNS = {
    "pt_p1.00": ("none", None, 8),
    "pt_p0.75": ("rcla", 0.75, 8),
    "pt_p0.50": ("rcla", 0.5, 8),
    "pt_p0.25": ("rcla", 0.25, 8),
    "pt_std_L4": ("none", None, 4),
    "pt_std_L2": ("none", None, 2),
}
#: more seeds of the runs behind the |S| = L/2 comparison (R-CLA p=0.75 under every:2 against the standard
#: 4-layer model; seeds 1-4), and a second seed of the standard 8-layer model: the run-to-run noise (last)
SEEDS = range(1, 5)
SEED_RUNS = {**{f"pt_p0.75_seed{s}": ("rcla", 0.75, 8, s) for s in SEEDS},
             **{f"pt_std_L4_seed{s}": ("none", None, 4, s) for s in SEEDS},
             "pt_p1.00_seed1": ("none", None, 8, 1)}
#: R-CLA with plan-shaped sources (``--sources plan``: each layer owns with probability p, the others read
#: the nearest earlier owner), the fine-tuning sweep's best source draw, from scratch (seeds 0-3)
PLAN_SOURCE_RUNS = {"pt_p0.75_plan": ("rcla", 0.75, 8, 0, "plan"),
                    **{f"pt_p0.75_plan_seed{s}": ("rcla", 0.75, 8, s, "plan") for s in range(1, 4)}}


#: every run of this script: name -> (routing, p, layers, seed[, sources]); the extra seeds last
ALL_RUNS = {**{n: (*v, 0) for n, v in RUNS.items()}, **PLAN_SOURCE_RUNS,
            **({} if os.environ.get("KVR_NO_SEED_CHECK") else SEED_RUNS)}


def train_args(name: str) -> tuple[tuple, dict]:
    """``c.train_run`` / ``c.run_key`` arguments of one run: (routing, p, layers), overrides."""
    routing, p, layers, seed, *sources = ALL_RUNS[name]
    return (routing, p, layers), {"seed": seed, **({"sources": sources[0]} if sources else {})}


def run_key(name: str) -> dict:
    """The settings key :func:`common.train_run` gives run ``name`` (for carrying committed entries over)."""
    args, overrides = train_args(name)
    return c.run_key(*args, **overrides)


def run_one(name: str) -> dict:
    """Train (cached) and score (cached) one run; returns its result entry."""
    args, overrides = train_args(name)
    layers = args[2]
    summary = {**c.train_run(name, *args, **overrides), "sources": overrides.get("sources", "uniform"),
               "steps_to_train_loss": c.loss_milestones(name)}
    plans = DEEP_PLANS if layers == c.LAYERS else ["full"]
    return {**summary, "loss": c.loss_table(c.eval_run(name, plans))}


#: the |S| = L/2 comparison: (label, run name stem, plan scored)
HALF_CACHE = (("R-CLA p=0.75, 8 layers, every:2", "pt_p0.75", "every:2"),
              ("R-CLA p=0.75, plan sources, every:2", "pt_p0.75_plan", "every:2"),
              ("standard 4 layers, full", "pt_std_L4", "full"),
              ("standard 8 layers, every:2", "pt_p1.00", "every:2"))


def seeds_of(runs: dict[str, dict], stem: str) -> list[str]:
    """``stem`` and its ``stem_seedN`` runs present in ``runs``, by seed."""
    names = [n for n in runs if n == stem or n.startswith(f"{stem}_seed")]
    return sorted(names, key=lambda n: runs[n]["seed"])


def seed_stats(runs: dict[str, dict]) -> dict:
    """Over seeds, for each model of :data:`HALF_CACHE` (held-out mean loss): mean, sample std, standard error;
    and for each R-CLA model, its difference from the standard 4-layer model (standard error of independent
    samples, Welch's t, and in how many seed pairs R-CLA is lower)."""
    models: dict = {}
    for label, stem, plan in HALF_CACHE:
        names = seeds_of(runs, stem)
        values = [runs[n]["loss"][plan]["mean"] for n in names if plan in runs[n]["loss"]]
        if not values:
            continue
        mean = statistics.mean(values)
        std = statistics.stdev(values) if len(values) > 1 else None
        models[stem] = {"label": label, "plan": plan,
                        "kv_kib_per_token": runs[names[0]]["loss"][plan]["kv_kib_per_token"],
                        "seeds": [runs[n]["seed"] for n in names], "values": values,
                        "mean": mean, "std": std, "se": std / len(values) ** 0.5 if std is not None else None}
    shallow = models.get("pt_std_L4")
    vs = {}
    for stem in ("pt_p0.75", "pt_p0.75_plan"):
        rcla = models.get(stem)
        if not (rcla and shallow and rcla["se"] is not None and shallow["se"] is not None):
            continue
        diff = rcla["mean"] - shallow["mean"]
        se = (rcla["se"] ** 2 + shallow["se"] ** 2) ** 0.5
        vs[stem] = {"diff": diff, "se": se, "welch_t": diff / se if se else None,
                    "pairs_rcla_lower": sum(a < b for a in rcla["values"] for b in shallow["values"]),
                    "pairs": len(rcla["values"]) * len(shallow["values"])}
    return {"models": models, "minus_L4": vs}


def collect(runs: dict[str, dict]) -> None:
    results = {"experiment": "pretrain", "machine": c.machine(), "model": {"preset": c.PRESET_FIELDS},
               "train": {**c.TRAIN, "betas": list(c.TRAIN["betas"])}, "eval": c.EVAL, "split": c.setup(),
               "tokenizer": {"type": "byte-level BPE", "vocab": c.VOCAB, "trained_on": "train split only"},
               "train_wall_s_total": round(sum(r["wall_s"] for r in runs.values()), 1),
               "half_cache_seeds": seed_stats(runs), "runs": runs}
    c.write_json(c.RESULTS / "pretrain.json", results)
    plot(results)


def main(argv: list[str] | None = None) -> None:
    c.run_experiment(__file__, list(ALL_RUNS), run_one, collect, argv, results_file=c.RESULTS / "pretrain.json",
                     key_of=run_key)


def plot(results: dict) -> None:
    runs = results["runs"]
    extra = {stem: seeds_of(runs, stem)[1:] for stem in ("pt_p1.00", "pt_p0.75", "pt_std_L4")}

    def label(n: str) -> str:
        name = "p=1.0 (standard, 8 layers)" if runs[n]["p"] is None else f"R-CLA p={runs[n]['p']}"
        return name + (", seed 0" if extra.get(n) else "")

    lines = [{"label": label(n), "table": runs[n]["loss"], "style": "o-"}
             for n in ("pt_p1.00", "pt_p0.75", "pt_p0.50", "pt_p0.25") if n in runs]

    def seeds(names: list[str]) -> str:
        return ("seed " if len(names) == 1 else "seeds ") + ", ".join(str(runs[m]["seed"]) for m in names)

    for stem, text, color in (("pt_p1.00", "p=1.0 (standard, 8 layers)", "C0"), ("pt_p0.75", "R-CLA p=0.75", "C1")):
        for i, n in enumerate(extra[stem]):
            lines.append({"label": f"{text}, {seeds(extra[stem])}" if i == 0 else None, "table": runs[n]["loss"],
                          "style": "x:", "annotate": False, "color": color})
    for i, n in enumerate(extra["pt_std_L4"]):
        lines.append({"label": f"standard 4 layers, {seeds(extra['pt_std_L4'])}" if i == 0 else None,
                      "style": "k+", "annotate": False, "table": {"4 layers": runs[n]["loss"]["full"]}})
    shallow = {}
    for n, layers in (("pt_std_L2", 2), ("pt_std_L4", 4), ("pt_p1.00", 8)):
        if n in runs and "full" in runs[n]["loss"]:
            shallow[f"{layers} layers"] = runs[n]["loss"]["full"]
    if shallow:
        lines.append({"label": "standard, fewer layers (2/4/8), full cache, seed 0", "table": shallow,
                      "style": "ks--"})
    title = f"from scratch, {c.TRAIN['max_steps'] * c.TRAIN['batch_size'] * c.TRAIN['seq_len']:,} tokens"
    c.plot_lines(lines, c.IMG / "pretrain_loss_vs_cache.png", title)
    if results.get("half_cache_seeds", {}).get("models"):
        plot_seeds(results["half_cache_seeds"]["models"], c.IMG / "pretrain_half_cache_seeds.png", title)


def plot_seeds(stats: dict, out: Path, title: str) -> Path:
    """Each seed's held-out loss for the models of :data:`HALF_CACHE` (same KV size), with mean +- standard error."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    models = [stats[stem] for _, stem, _ in HALF_CACHE if stem in stats]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, m in enumerate(models):
        ax.plot([i] * len(m["values"]), m["values"], "o", alpha=0.6, color=f"C{i}")
        for seed, v in zip(m["seeds"], m["values"]):
            ax.annotate(str(seed), (i, v), textcoords="offset points", xytext=(6, -3), fontsize=7)
        if m["se"] is not None:
            ax.errorbar([i + 0.18], [m["mean"]], yerr=[m["se"]], fmt="s", color=f"C{i}", capsize=4)
    ax.set_xticks(range(len(models)), [m["label"].replace(", ", "\n", 1) for m in models], fontsize=8)
    ax.set_xlim(-0.5, len(models) - 0.3)
    ax.set_ylabel("held-out loss (nats/token, lower is better)")
    kib = ", ".join(sorted({f"{m['kv_kib_per_token']:g}" for m in models}))
    ax.set_title(f"same KV cache ({kib} KiB/token), by seed; {title}", fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    main()
