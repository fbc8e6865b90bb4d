"""Benchmark: KV memory, peak memory, time to first token, decode speed and capacity per plan.

For every (context, batch) and plan, and for the unmodified transformers model with
its ``DynamicCache`` (the ``hf`` baseline row), one repeat is: a fresh cache, a
timed prefill of ``context`` random tokens (TTFT), then ``new_tokens`` timed greedy
decode steps in a hand loop. Routed plans use a ``SharedKVCache`` preallocated to
``context + new_tokens`` tokens, so decode never copies the cache. Figures are
medians over ``repeats`` after ``warmup`` untimed repeats; the repeats go
round-robin over the rows, so a change of machine load hits every row alike.

KV bytes are read from the cache tensors after the run; the largest batch for a KV
budget is ``budget // (kv bytes per sequence)``. A checkpoint folder's saved
calibration (:mod:`kvroute.calibrate`) is loaded, so its calibrated plans are timed
with their maps; each row says whether it ran ``calibrated``.

Example:
    >>> cfg = BenchConfig(model="smollm2-135m", contexts=[2048], plans=["full", "every:4"])  # doctest: +SKIP
    >>> report = run_bench(cfg)                                                              # doctest: +SKIP
    >>> write_report(report, "bench_out")                                                    # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvroute.budget import format_bytes, size_option
from kvroute.hf.cache import cache_nbytes
from kvroute.hf.compat import cache_kwargs
from kvroute.measure import PeakMemory, loadavg, sync
from kvroute.plan import KVShape, SharingPlan, parse_plan_list
from kvroute.plots import bench_plot
from kvroute.precision import cpu_has_fast_bf16, cpu_model
from kvroute.results import plan_label

BASELINE = "hf"
MB = 1e6


@dataclass
class BenchConfig:
    """What to benchmark.

    Args:
        model: a named shape (random weights, see :mod:`kvroute.shapes`) or a checkpoint folder.
        plans: plan specs (a list, or comma-separated: ``every:1,2,4,8``, the default).
        contexts: prompt lengths in tokens (a list, or comma-separated: ``512,2048``).
        batches: batch sizes (a list, or comma-separated).
        new_tokens: decode steps per repeat.
        repeats: timed repeats (medians are reported).
        warmup: untimed repeats first.
        dtype: model and cache dtype.
        device: ``cpu`` or ``cuda``.
        threads: torch intra-op threads, set by the command line entry point (``kvroute bench``) before the
            run; the library leaves the process's setting alone and records the count it ran with.
        kv_budget: KV memory budget for the largest-batch column: bytes, or a size such as ``1GiB`` (None: skip).
        kv_quant: KV storage of the plans' caches, each measured: ``none``, ``int8``, ``int4`` (a list, or
            comma-separated).
        baseline: include the unmodified-transformers row.
        random_weights: for a checkpoint, use its config with random weights.
        seed: seed of the weights (shapes) and of the prompt tokens.
    """

    model: str = "smollm2-135m"
    plans: list[str] = field(default_factory=lambda: parse_plan_list("every:1,2,4,8"))
    contexts: list[int] = field(default_factory=lambda: [512])
    batches: list[int] = field(default_factory=lambda: [1])
    new_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None
    kv_budget: int | str | None = None
    kv_quant: list[str] = field(default_factory=lambda: ["none"])
    baseline: bool = True
    random_weights: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.plans, str):
            self.plans = parse_plan_list(self.plans)
        for name, flag in (("contexts", "--context"), ("batches", "--batch")):
            values = getattr(self, name)
            if isinstance(values, (str, int)):  # "512,2048" (a flag or a config file), or one number
                try:
                    values = [int(v) for v in str(values).split(",") if v.strip()]
                except ValueError:
                    raise ValueError(f"{flag}: expected comma-separated integers, got {values!r}") from None
                setattr(self, name, values)
            if not values or any(int(v) <= 0 for v in values):
                raise ValueError(f"{flag}: positive integers required, got {values}")
        for name, low in (("new_tokens", 1), ("repeats", 1), ("warmup", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        if isinstance(self.kv_budget, str):
            self.kv_budget = size_option("--kv-budget", self.kv_budget)
        if self.kv_budget is not None and self.kv_budget <= 0:
            raise ValueError(f"--kv-budget must be positive, got {self.kv_budget}")
        from kvroute.kvquant import KVQuant

        quants = self.kv_quant.split(",") if isinstance(self.kv_quant, str) else list(self.kv_quant)
        self.kv_quant = [q.strip().lower() or "none" for q in quants] or ["none"]
        for q in self.kv_quant:
            KVQuant.parse(q)
        if not self.plans and not self.baseline:
            raise ValueError("nothing to benchmark: no plans and no baseline")


@dataclass
class BenchReport:
    """Results: one row per (context, batch, plan) and the setup they were measured in."""

    config: BenchConfig
    meta: dict[str, Any]
    rows: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "meta": self.meta, "rows": self.rows}

    def table(self) -> str:
        """A markdown table of all rows."""
        budget = self.config.kv_budget
        cols = ["context", "batch", "plan", "owners", "KV MB", "KV vs full", "peak MB", "TTFT ms",
                "TTFT vs full", "decode tok/s", "decode vs full", "decode vs hf"]
        if budget:
            cols.append(f"max batch @ {format_bytes(budget)}")
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.rows:
            cells = [r["context"], r["batch"], plan_label(r), r["owners"], f"{r['kv_mb']:.1f}", _x(r["kv_vs_full"]),
                     f"{r['peak_mb']:.0f}", f"{r['ttft_ms']:.1f}", _x(r["ttft_vs_full"]),
                     f"{r['decode_tok_s']:.2f}", _x(r["decode_vs_full"]), _x(r["decode_vs_hf"])]
            if budget:
                cells.append(r["max_batch"] if r["max_batch"] else "0 (batch 1 does not fit)")
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        return "\n".join(lines)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


# --------------------------------------------------------------------------- model
def load_bench_model(config: BenchConfig) -> torch.nn.Module:
    """The unrouted model: random weights for a named shape (or with ``random_weights``), else the checkpoint."""
    from kvroute.models import load_model
    from kvroute.shapes import is_shape, random_model, resolve_config

    if is_shape(config.model) or config.random_weights:
        model = random_model(resolve_config(config.model), config.dtype, config.seed)
    else:
        model = load_model(config.model, dtype=config.dtype)
    return model.to(config.device).eval()


# ---------------------------------------------------------------------- measuring
@torch.inference_mode()
def _one_repeat(model: torch.nn.Module, prompt: torch.Tensor, cache: Any, new_tokens: int, device: str):
    """Prefill then ``new_tokens`` greedy decode steps; returns (ttft_s, decode_s). No per-layer Python here."""
    sync(device)
    t0 = time.perf_counter()
    logits = model(input_ids=prompt, **cache_kwargs(cache), use_cache=True, logits_to_keep=1).logits
    token = logits[:, -1:].argmax(-1)  # (B, 1)
    sync(device)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        logits = model(input_ids=token, **cache_kwargs(cache), use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
    sync(device)
    return t1 - t0, time.perf_counter() - t1


@dataclass
class _Variant:
    """One row kind: the unmodified model with a DynamicCache, or the routed model under a plan."""

    name: str
    model: torch.nn.Module
    plan: SharingPlan | None = None
    kv_quant: str = "none"
    ttfts: list[float] = field(default_factory=list)
    decodes: list[float] = field(default_factory=list)
    peak: int = 0
    kv: int = 0

    def make_cache(self, shape: KVShape, max_len: int) -> Any:
        from transformers.cache_utils import DynamicCache

        from kvroute.hf.cache import SharedKVCache

        if self.plan is None:
            return DynamicCache(config=self.model.config)
        return SharedKVCache(self.plan, shape, max_cache_len=max_len, kv_quant=self.kv_quant)


def _measure(variants: list[_Variant], prompt: torch.Tensor, shape: KVShape, cfg: BenchConfig, peak: PeakMemory) -> None:
    """Round-robin: each repeat runs every variant once, so load drift hits all rows alike."""
    from kvroute.hf.patch import set_plan

    max_len = prompt.shape[1] + cfg.new_tokens
    for r in range(cfg.warmup + cfg.repeats):
        for v in variants:
            if v.plan is not None:
                set_plan(v.model, v.plan)
            cache = v.make_cache(shape, max_len)
            peak.reset()
            ttft, dec = _one_repeat(v.model, prompt, cache, cfg.new_tokens, cfg.device)
            if r < cfg.warmup:
                continue
            v.peak = max(v.peak, peak.peak_bytes())
            v.ttfts.append(ttft)
            v.decodes.append(prompt.shape[0] * cfg.new_tokens / dec)
            v.kv = cache_nbytes(cache)
            del cache


def run_bench(config: BenchConfig, model: torch.nn.Module | None = None, progress: bool = True) -> BenchReport:
    """Measure every (context, batch) x plan, and the unmodified model.

    The routed model is a structural copy of the unmodified one that shares its
    weights (no extra weight memory); repeats go round-robin over the rows. When the
    weights come from a checkpoint folder, its saved calibration is loaded onto the
    routed copy.

    Args:
        config: what to measure.
        model: an unrouted model to use instead of loading ``config.model`` (no calibration).
        progress: print one line per measured row to stderr.

    Returns:
        The report; :func:`write_report` writes it as JSON, markdown and PNG.
    """
    import copy

    from kvroute.calibrate import is_calibrated, load_calibration
    from kvroute.hf.patch import apply, is_routed
    from kvroute.pairs import load_pair_maps

    folder = model is None and not config.random_weights and Path(config.model).is_dir()  # a checkpoint folder
    model = model if model is not None else load_bench_model(config)
    if is_routed(model):
        raise ValueError("run_bench needs an unrouted model; pass one that kvroute.apply has not touched")
    shape = KVShape.from_config(model.config)
    plans = [SharingPlan.for_model(spec, model.config) for spec in config.plans]
    meta = _meta(model, config, shape)
    peak = PeakMemory(config.device)
    meta["peak_memory"] = peak.kind
    routed = None
    if plans:  # same parameter tensors, routed attention modules
        shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
        routed = apply(copy.deepcopy(model, memo=shared), plan=plans[0]).eval()
        if folder:  # its calibrated plans run (and are timed) with their maps
            load_calibration(routed, config.model)
            load_pair_maps(routed, config.model)
    gen = torch.Generator().manual_seed(config.seed)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    measured: dict[tuple[int, int, str], dict[str, Any]] = {}
    for c in config.contexts:
        for b in config.batches:
            prompt = torch.randint(0, vocab, (b, c), generator=gen).to(config.device)
            variants = [_Variant(BASELINE, model)] if config.baseline else []
            variants += [_Variant(p.spec if q == "none" else f"{p.spec} + {q}", routed, p, q)
                         for p in plans for q in config.kv_quant]
            _measure(variants, prompt, shape, config, peak)
            for v in variants:
                row = {
                    "context": c, "batch": b, "plan": v.plan.spec if v.plan else v.name, "kv_quant": v.kv_quant,
                    "calibrated": v.plan is not None and is_calibrated(v.model, v.plan),
                    "owners": len(v.plan.owners) if v.plan else shape.num_layers,
                    "retention": v.plan.retention if v.plan else 1.0,
                    "cache": "SharedKVCache" if v.plan else "DynamicCache",
                    "kv_bytes": v.kv, "kv_mb": v.kv / MB, "peak_mb": v.peak / MB,
                    "ttft_ms": statistics.median(v.ttfts) * 1e3,
                    "decode_tok_s": statistics.median(v.decodes),
                    "ttft_ms_best": min(v.ttfts) * 1e3,  # least disturbed repeat, for loaded machines
                    "decode_tok_s_best": max(v.decodes),
                    "ttft_ms_all": [round(t * 1e3, 3) for t in v.ttfts],
                    "decode_tok_s_all": [round(d, 3) for d in v.decodes],
                }
                if v.plan is not None:
                    row["kv_expected_bytes"] = v.plan.kv_bytes(shape, c + config.new_tokens, b, model.dtype,
                                                               v.kv_quant)
                measured[(c, b, v.name)] = row
                if progress:
                    print(f"  ctx {c:>6} batch {b:>3} {plan_label(row):>10}: KV {row['kv_mb']:.1f} MB, "
                          f"TTFT {row['ttft_ms']:.1f} ms, decode {row['decode_tok_s']:.2f} tok/s", file=sys.stderr)
    meta["loadavg_end"] = loadavg()
    names = [p.spec if q == "none" else f"{p.spec} + {q}" for p in plans for q in config.kv_quant]
    rows = _with_ratios(measured, config, [BASELINE] * config.baseline + names)
    return BenchReport(config, meta, rows)


def _with_ratios(measured, config: BenchConfig, order: list[str]) -> list[dict[str, Any]]:
    first = (config.contexts[0], config.batches[0])
    full_spec = next((s for s in order if s != BASELINE and measured[(*first, s)]["retention"] == 1.0
                      and measured[(*first, s)]["kv_quant"] == "none"), None)
    rows = []
    for c in config.contexts:
        for b in config.batches:
            full = measured.get((c, b, full_spec)) if full_spec else None
            hf = measured.get((c, b, BASELINE))
            for spec in order:
                r = dict(measured[(c, b, spec)])
                r["kv_vs_full"] = r["kv_bytes"] / full["kv_bytes"] if full else None
                r["ttft_vs_full"] = r["ttft_ms"] / full["ttft_ms"] if full else None
                r["decode_vs_full"] = r["decode_tok_s"] / full["decode_tok_s"] if full else None
                r["ttft_vs_hf"] = r["ttft_ms"] / hf["ttft_ms"] if hf else None
                r["decode_vs_hf"] = r["decode_tok_s"] / hf["decode_tok_s"] if hf else None
                per_seq = r["kv_bytes"] / b
                r["kv_bytes_per_seq"] = per_seq
                r["max_batch"] = int(config.kv_budget // per_seq) if config.kv_budget and per_seq else None
                rows.append(r)
    return rows


def _meta(model: torch.nn.Module, config: BenchConfig, shape: KVShape) -> dict[str, Any]:
    import transformers

    import kvroute

    text = model.config.get_text_config(decoder=True)
    return {
        "model": config.model,
        "weights": "random" if config.random_weights or not Path(config.model).exists() else "checkpoint",
        "shape": {
            "model_type": text.model_type, "layers": shape.num_layers, "hidden": text.hidden_size,
            "heads": text.num_attention_heads, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim,
            "intermediate": text.intermediate_size, "vocab": text.vocab_size,
            "params": sum(p.numel() for p in model.parameters()),
        },
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": config.device,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS",
                                               "KMP_AFFINITY", "OMP_PROC_BIND")},
        "cpu_count": os.cpu_count(),
        "cpu": cpu_model(),
        "cpu_fast_bf16": cpu_has_fast_bf16(),
        "loadavg_start": loadavg(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kvroute": kvroute.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name() if str(config.device).startswith("cuda") else None,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ------------------------------------------------------------------------ outputs
def write_report(report: BenchReport, out_dir: str | os.PathLike, command: str | None = None) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.md`` and ``bench.png`` (if matplotlib is installed) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = report.to_dict()
    if command:
        data["meta"]["command"] = command
    paths = {"json": out / "bench.json", "md": out / "bench.md"}
    paths["json"].write_text(json.dumps(data, indent=2))
    m = report.meta
    s = m["shape"]
    header = [
        f"# kvroute bench: {m['model']} ({m['weights']} weights)",
        "",
        f"- shape: {s['model_type']}, {s['layers']} layers, hidden {s['hidden']}, {s['heads']} heads, "
        f"{s['kv_heads']} KV heads x {s['head_dim']}, intermediate {s['intermediate']}, vocab {s['vocab']}, "
        f"{s['params'] / 1e6:.1f}M params",
        f"- dtype {m['dtype']}, device {m['device']}{' (' + m['gpu'] + ')' if m.get('gpu') else ''}, "
        f"threads {m['threads']}, env {m['env']}",
        f"- CPU {m.get('cpu', 'unknown')} x {m.get('cpu_count')}"
        f"{'' if m.get('cpu_fast_bf16', True) else ' (no native bf16: bf16 runs emulated, slower than fp32)'}",
        f"- torch {m['torch']}, transformers {m['transformers']}, {m['platform']}; load average "
        f"{m['loadavg_start']} -> {m.get('loadavg_end')}",
        f"- {report.config.new_tokens} decode tokens; medians of {report.config.repeats} repeats after "
        f"{report.config.warmup} warm-up; peak memory: {m['peak_memory']}",
    ]
    if command:
        header.append(f"- command: `{command}`")
    best = ["", "Best repeat (lowest TTFT, highest decode tok/s): less sensitive to other jobs on a shared machine.",
            "", "| context | batch | plan | best TTFT ms | best decode tok/s | all TTFT ms | all decode tok/s |",
            "|---|---|---|---|---|---|---|"]
    best += [f"| {r['context']} | {r['batch']} | {plan_label(r)} | {r['ttft_ms_best']:.1f} | {r['decode_tok_s_best']:.2f} "
             f"| {r['ttft_ms_all']} | {r['decode_tok_s_all']} |" for r in report.rows]
    paths["md"].write_text("\n".join(header) + "\n\n" + report.table() + "\n" + "\n".join(best) + "\n")
    png = bench_plot(report, out / "bench.png")
    if png is not None:
        paths["png"] = png
    return paths

