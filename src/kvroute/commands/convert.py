"""kvroute convert: write a model (a GGUF file included) as a plain safetensors checkpoint."""

from __future__ import annotations

import argparse

NAME = "convert"
HELP = "Write a hub id, folder or GGUF file as a plain safetensors checkpoint."


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="hub id, model folder or .gguf file (dequantized)")
    p.add_argument("out", help="output folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def run(args: argparse.Namespace) -> int:
    from kvroute.models import convert

    out = convert(args.source, args.out, dtype=args.dtype)
    print(f"wrote {out}")
    return 0
