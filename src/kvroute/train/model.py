"""The model a run trains and how: the starting weights (checkpoint or preset), LoRA, the frozen
teacher, carried calibrations and pairwise maps, the optimizer and the learning-rate schedule."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvroute import sharding
from kvroute.hf.patch import PlanMismatchWarning, get_router, is_routed, set_plan
from kvroute.plan import KVShape, SharingPlan
from kvroute.shapes import preset_config
from kvroute.train.config import TrainConfig, _check_routing


def _carry_calibration(model: torch.nn.Module, folder: str | Path) -> None:
    """With ``plan:SPEC`` routing (or a mix with ``plan:`` parts), keep the starting checkpoint's
    calibration of the plan(s) it trains for (``kvroute calibrate``): the steps that route as one of
    them use its maps in training, and they are saved with every checkpoint. The maps stay fixed; the
    weights learn around them. Other calibrations would go stale as the weights change, so they are
    not carried."""
    from kvroute.calibrate import load_calibration, remove_calibration

    router = get_router(model)
    shape = KVShape.from_config(model.config)
    drawn = {SharingPlan.from_spec(spec, shape.num_layers, shape.layer_types).source
             for spec in router.policy.drawn_plans}
    if not drawn or not Path(str(folder)).is_dir():
        return
    for source in load_calibration(model, folder):
        if source not in drawn:
            remove_calibration(model, "source:" + ",".join(map(str, source)))


def _start_pair_maps(model: torch.nn.Module, folder: str | Path | None, report: bool) -> None:
    """``--pair-maps``: the starting checkpoint's pairwise maps, and the identity for the pairs it lacks."""
    from kvroute.pairs import add_pair_maps, load_pair_maps

    loaded = load_pair_maps(model, folder) if folder is not None and Path(str(folder)).is_dir() else 0
    added = add_pair_maps(model)
    if report:
        print(f"pairwise maps: {loaded} from {folder}, {added} new (identity)"
              + ("; `kvroute calibrate --pairs` gives them a closed-form start" if not loaded else ""), flush=True)


def _starting_model(config: TrainConfig, tokenizer: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from kvroute.models import load_model

    if config.model is not None:
        return load_model(config.model)
    model_config = preset_config(
        config.preset, vocab_size=len(tokenizer), layers=config.layers, max_positions=config.seq_len,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    _check_routing(config, model_config)
    torch.manual_seed(config.seed)
    return AutoModelForCausalLM.from_config(model_config, attn_implementation="sdpa")


def _add_lora(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = [t.strip() for t in config.lora_targets.split(",") if t.strip()]
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _optimizer(model: torch.nn.Module, config: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW; ``fused``: torch's one-kernel update (CPU or CUDA parameters, not FSDP2's DTensors), which
    on 2 CPU cores took 0.09 s against 0.41 s for the default per-tensor-list update of SmolLM2-135M."""
    from kvroute.pairs import PAIRS_PREFIX

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    pairs = [p for n, p in named if PAIRS_PREFIX in n]  # near the identity or a fit: never decayed to 0
    params = [p for n, p in named if PAIRS_PREFIX not in n]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if pairs:
        groups.append({"params": pairs, "weight_decay": 0.0, "lr": config.pair_lr or config.lr})
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, fused=fused or None)


def _frozen_teacher(model: torch.nn.Module, device: torch.device, fsdp: bool) -> torch.nn.Module:
    """A frozen copy of the starting model under the full cache (``--distill-from base``)."""
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    if is_routed(teacher):  # a routed start keeps its saved plan; the teacher reads every layer's own KV
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PlanMismatchWarning)
            set_plan(teacher, "full")
    return sharding.shard(teacher, device) if fsdp else teacher.to(device)


@dataclass
class LRSchedule:
    """Multiplier of the peak lr: linear warm-up over ``warmup_steps``, then cosine/linear/constant."""

    total_steps: int
    warmup_steps: int
    kind: str = "cosine"
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1 - progress
        return self.min_ratio + (1 - self.min_ratio) * decay
