"""kvroute calibrate: fit per-plan KV calibration and save it with the checkpoint."""

from __future__ import annotations

import argparse
from dataclasses import fields

NAME = "calibrate"
HELP = "Fit per-plan calibration maps (no training) so shared plans stay close to the full cache; save them."


def configure(p: argparse.ArgumentParser) -> None:
    from kvroute.calibrate import CalibrationConfig

    d = CalibrationConfig()
    p.add_argument("checkpoint", help="kvroute or HF checkpoint folder, hub id or .gguf file")
    p.add_argument("--plans", help="comma-separated plan specs, e.g. every:2,every:4 (with --pairs: the plans "
                                   "to report, default every:2,every:4)")
    p.add_argument("--pairs", action="store_true",
                   help="fit pairwise maps instead: one per (layer, source layer), serving every plan "
                        "(about L^2/2 fits; --tokens 2048 keeps it to minutes)")
    p.add_argument("--data", action="append", required=True, metavar="PATH",
                   help="calibration text: a file or folder of .txt/.md files (repeatable); not your test text")
    p.add_argument("--out", default=None,
                   help="write a full checkpoint folder here (default: add the calibration to CHECKPOINT in place)")
    p.add_argument("--tokens", type=int, default=d.tokens, help=f"calibration tokens (default {d.tokens})")
    p.add_argument("--chunk-tokens", type=int, default=d.chunk_tokens, help="tokens per calibration sequence")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="share of chunks held out to choose ridges and judge refinement")
    p.add_argument("--no-query", dest="query", action="store_false", help="fit value maps only (faster)")
    p.add_argument("--value-maps", choices=["head", "group"], default=d.value_maps,
                   help="one value map per query head or per KV head")
    p.add_argument("--steps", type=int, default=d.steps, help="end-to-end refinement steps (0: closed form only)")
    p.add_argument("--lr", type=float, default=d.lr, help="refinement learning rate")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=d.precision,
                   help="autocast of the refinement passes (auto: bf16 where the hardware runs it natively)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="chunks per forward pass")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype the model runs in while fitting")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from kvroute.calibrate import CalibrationConfig, calibrate_checkpoint

    config = CalibrationConfig(**{f.name: getattr(args, f.name) for f in fields(CalibrationConfig)})
    if args.plans is None and not args.pairs:
        raise ValueError("--plans: give the plans to calibrate, e.g. every:2,every:4 (or --pairs for every plan)")
    out, results = calibrate_checkpoint(
        args.checkpoint, args.plans or "every:2,every:4", args.data, config, out=args.out, dtype=args.dtype,
        device=args.device, progress=not args.quiet, pairs=args.pairs,
    )
    for r in results:
        print(r.summary())
    print(f"wrote {out}")
    return 0
