"""kvroute calibrate: fit per-plan KV calibration and save it with the checkpoint."""

from __future__ import annotations

import argparse

NAME = "calibrate"
#: dests that are not CalibrationConfig fields (what to calibrate, where, and how to run); positional: checkpoint
CLI_ONLY = ("config", "checkpoint", "plans", "pairs", "data", "out", "dtype", "device", "quiet")
HELP = "Fit per-plan calibration maps (no training) so shared plans stay close to the full cache; save them."


def configure(p: argparse.ArgumentParser) -> None:
    from kvroute.calibrate import CalibrationConfig
    from kvroute.config_cli import add_config_flags

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
    add_config_flags(p, CalibrationConfig, value_maps={"choices": ["head", "group"]})
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype the model runs in while fitting")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def config(args: argparse.Namespace):
    """The validated :class:`~kvroute.calibrate.CalibrationConfig` these arguments ask for."""
    from kvroute.calibrate import CalibrationConfig
    from kvroute.config_cli import config_from_args

    if args.plans is None and not args.pairs:
        raise ValueError("--plans: give the plans to calibrate, e.g. every:2,every:4 (or --pairs for every plan)")
    return config_from_args(CalibrationConfig, args)


def run(args: argparse.Namespace) -> int:
    from kvroute.calibrate import calibrate_checkpoint

    out, results = calibrate_checkpoint(
        args.checkpoint, args.plans or "every:2,every:4", args.data, config(args), out=args.out, dtype=args.dtype,
        device=args.device, progress=not args.quiet, pairs=args.pairs,
    )
    for r in results:
        print(r.summary())
    print(f"wrote {out}")
    return 0
