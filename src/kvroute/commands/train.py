"""kvroute train: fine-tune a checkpoint or pre-train a preset with R-CLA (or a baseline policy).

Flags come from :class:`kvroute.train.TrainConfig` (:mod:`kvroute.config_cli`). CLI-only:
``--config FILE``; ``--config PRESET`` is the old spelling of ``--preset`` (kept one release).
"""

from __future__ import annotations

import argparse

NAME = "train"
HELP = "Fine-tune a model (hub id, folder, .gguf) or pre-train a preset with stochastic KV routing."
#: dests that are not TrainConfig fields
CLI_ONLY = ("config",)

_GROUPS = {
    **dict.fromkeys(["routing", "p", "sources", "plan", "eval_plans", "distill", "distill_hidden", "distill_from",
                     "pair_maps", "pair_lr", "maps_only", "unlikelihood", "seq_unlikelihood", "seq_ul_prefix",
                     "seq_ul_length", "seq_ul_ngram"], "routing"),
    **dict.fromkeys(["seq_len", "batch_size", "grad_accum", "max_steps", "lr", "weight_decay", "betas", "grad_clip",
                     "warmup", "schedule", "min_lr_ratio", "precision", "gradient_checkpointing", "seed", "device",
                     "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "fsdp"], "optimization"),
    **dict.fromkeys(["val_fraction", "question_first_p", "cache_dir", "eval_every", "eval_batches", "save_every",
                     "keep_checkpoints", "log_every", "resume", "tensorboard", "quiet"], "data, eval and checkpoints"),
}


def configure(p: argparse.ArgumentParser) -> None:
    from kvroute.config_cli import add_config_flags
    from kvroute.shapes import PRESETS
    from kvroute.train import TrainConfig

    p.add_argument("model", nargs="?", default=argparse.SUPPRESS, help="hub id, model folder or .gguf file to fine-tune")
    add_config_flags(
        p, TrainConfig, skip={"model"}, groups=_GROUPS,
        preset={"choices": list(PRESETS), "metavar": "NAME"},
        data={"action": None},  # one list, as before: --data A B (a repeated --data replaces it)
        output_dir={"flags": ["--output-dir", "--output", "-o"]},
        betas={"metavar": ("B1", "B2")},
        resume={"nargs": "?", "const": "latest", "help": "continue from the latest (or this) checkpoint"},
    )


def config(args: argparse.Namespace):
    """The validated :class:`~kvroute.train.TrainConfig` these arguments ask for."""
    from pathlib import Path

    from kvroute.config_cli import config_from_args, warn
    from kvroute.shapes import PRESETS
    from kvroute.train import TrainConfig

    legacy = getattr(args, "config", None)
    if legacy in PRESETS and not Path(legacy).is_file():  # the old --config PRESET
        warn(f"`--config {legacy}` for a preset is deprecated and goes in the next release: use "
             f"`--preset {legacy}` (--config now reads a TOML or YAML file)")
        del args.config
        args.preset = getattr(args, "preset", legacy)
    return config_from_args(TrainConfig, args)


def run(args: argparse.Namespace) -> int:
    from kvroute.train import train

    result = train(config(args))
    if not result.main_process:
        return 0
    summary = "  ".join(f"{plan}: {loss:.3f}" for plan, loss in result.eval_loss.items())
    print(f"trained {result.steps} steps; final model in {result.final_checkpoint}"
          + (f"; eval loss {summary}" if summary else ""))
    return 0
