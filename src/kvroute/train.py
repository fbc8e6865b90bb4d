"""Training with stochastic KV routing: fine-tune a checkpoint or pre-train from a preset.

A plain loop on HF Accelerate, so ``accelerate launch`` / ``torchrun`` run it on
several GPUs (DDP) with no code change. Every forward pass in training mode draws
a route from the policy (R-CLA, CLA@k, RD-CLA@k, none); eval runs under fixed
plans. A resumed run restores weights, optimizer, scheduler, RNGs, the router's
generator and the data position, so its losses equal an uninterrupted run's.

Example:
    >>> cfg = TrainConfig(data=["assets/text/sotu/data"], model="assets/smollm2-135m",
    ...                   routing="rcla", p=0.6, max_steps=300, output_dir="runs/rcla")  # doctest: +SKIP
    >>> result = train(cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from kvroute.data.qa import IGNORE_INDEX, QACollator, load_qa
from kvroute.data.mix import Mixture
from kvroute.precision import PRECISIONS, autocast, resolve_precision
from kvroute.data.text import TEXT_SUFFIXES, collate_blocks, load_text, resolve_files
from kvroute import sharding
from kvroute.hf.patch import PlanMismatchWarning, apply, get_router, is_routed, set_plan
from kvroute.plan import KVShape, SharingPlan, parse_plan_list
from kvroute.policy import NoRouting, RoutingPolicy, policy_from_spec
from kvroute.presets import PRESETS, preset_config
from kvroute.trainlog import (
    STATE_DIR, MetricsLog, commit_training_state, latest_checkpoint, load_training_state, remove_partial_checkpoints,
    stage_training_state,
    staging_dir,
)

SCHEDULES = ("cosine", "linear", "constant")
DATA_FORMATS = ("auto", "text", "qa", "mix")


@dataclass
class TrainConfig:
    """Everything a training run needs; validated on construction (errors name the CLI flag).

    Args:
        data: text files, folders, globs, ``hf:NAME`` datasets, or JSONL QA files (both: a mixture).
        output_dir: checkpoints, metrics and the final model go here.
        model: hub id, folder or ``.gguf`` file to fine-tune (exclusive with ``preset``).
        preset: a :data:`kvroute.presets.PRESETS` name to pre-train from scratch (CLI ``--config``).
        layers: depth override for ``preset``.
        tokenizer: tokenizer source; default: ``model`` (required with ``preset``).
        data_format: ``text``, ``qa``, ``mix`` or ``auto`` (QA when every source is a ``.jsonl`` file,
            a mix when some are: ``.jsonl`` sources are QA, the others text).
        routing: ``rcla``, ``cla:K``, ``rdcla:K``, ``none`` or ``plan:SPEC`` (train for that one plan).
        p: probability a layer keeps its own KV (rcla, rdcla); None: the policy's default (0.6).
        sources: rcla source draw, ``uniform`` (paper), ``nearest`` or ``plan``.
        plan: default inference plan saved with the checkpoints; None: SPEC for ``plan:SPEC``
            routing, else ``full``.
        eval_plans: comma-separated plans the eval loss is measured under.
        distill: weight of KL(teacher || routed student) on routed passes (0: off).
        distill_hidden: weight of layer-wise hidden-state distillation on routed passes (0: off):
            each decoder layer's output under the route is pulled to the teacher's (full cache),
            as a squared error relative to the teacher's norm, averaged over layers. It uses the
            same teacher as ``distill`` (``distill_from``).
        distill_from: teacher: ``self`` (the same model, unrouted) or ``base`` (frozen start).
        pair_maps: train pairwise maps (:mod:`kvroute.pairs`) with the routes: whenever a route
            makes layer l read layer o's KV, the (l, o) maps apply and learn. They start from the
            checkpoint's own (``kvroute calibrate --pairs``), else from the identity, and are saved
            with every checkpoint, so every plan the model serves uses them.
        pair_lr: learning rate of the pairwise maps (None: ``lr``); no weight decay applies to them.
        maps_only: with ``pair_maps``, train only the maps; the model's weights stay frozen (a
            calibration for every plan at once, trained on the routes the policy draws).
        precision: ``bf16`` (autocast), ``fp32``, or ``auto``: bf16 where the device runs it natively
            (CUDA with bf16, CPUs with AMX/AVX512-BF16), else fp32 (:mod:`kvroute.precision`).
        lora_r: LoRA rank (0: full fine-tuning).
        fsdp: shard weights, gradients and optimizer state over the processes (FSDP2; launch with
            ``torchrun`` or ``accelerate launch``); checkpoints are then sharded (torch distributed checkpoint).
        resume: ``latest`` or a checkpoint folder to continue from.
    """

    data: list[str]
    output_dir: str = "runs/kvroute"
    model: str | None = None
    preset: str | None = None
    layers: int | None = None
    tokenizer: str | None = None
    data_format: str = "auto"
    routing: str = "rcla"
    p: float | None = None
    sources: str | None = None
    plan: str | None = None
    eval_plans: str = "full,every:2,every:4"
    seq_len: int = 256
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int = 100
    lr: float = 1e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    warmup: float = 0.05
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0
    device: str = "auto"
    lora_r: int = 0
    fsdp: bool = False
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"
    distill: float = 0.0
    distill_hidden: float = 0.0
    distill_from: str = "self"
    pair_maps: bool = False
    pair_lr: float | None = None
    maps_only: bool = False
    val_fraction: float = 0.05
    question_first_p: float = 0.5
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 1
    resume: str | None = None
    tensorboard: bool = True
    cache_dir: str | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        self.data = list(self.data)
        self.betas = tuple(float(b) for b in self.betas)
        if not self.data:
            raise ValueError("--data: give at least one file, folder, glob or hf: dataset")
        if (self.model is None) == (self.preset is None):
            raise ValueError("give a model to fine-tune or --config PRESET to train from scratch (exactly one)")
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ValueError(f"--config: unknown preset {self.preset!r}; expected one of {', '.join(PRESETS)}")
            if self.tokenizer is None:
                raise ValueError("--config PRESET needs --tokenizer (a hub id or folder) for its vocabulary")
        if self.layers is not None:
            if self.preset is None:
                raise ValueError("--layers only applies to --config PRESET (a pretrained model keeps its depth)")
            _positive("layers", self.layers)
        if self.p is not None and not 0.0 <= float(self.p) <= 1.0:
            raise ValueError(f"--p must be in [0, 1] (probability a layer keeps its own KV), got {self.p}")
        try:
            policy = self.policy
        except ValueError as err:
            raise ValueError(f"--routing: {err}") from None
        if self.plan is None:
            self.plan = policy.serves_only() or "full"
        _choice("data_format", self.data_format, DATA_FORMATS)
        if self.data_kind == "mix" and not 0 < len(self._qa_sources) < len(self.data):
            raise ValueError("--data-format mix needs both .jsonl QA files and text sources in --data")
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        _choice("distill_from", self.distill_from, ("self", "base"))
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_batches", "log_every"):
            _positive(name, getattr(self, name))
        for name in ("eval_every", "save_every", "keep_checkpoints", "lora_r"):
            if getattr(self, name) < 0:
                raise ValueError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        for name in ("weight_decay", "grad_clip", "distill", "distill_hidden"):
            if getattr(self, name) < 0:
                raise ValueError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("warmup", "val_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{_flag(name)} must be in [0, 1), got {getattr(self, name)}")
        for name in ("min_lr_ratio", "question_first_p", "lora_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{_flag(name)} must be in [0, 1], got {getattr(self, name)}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"--betas must be two numbers in [0, 1), got {self.betas}")
        if self.fsdp and self.lora_r:
            raise ValueError("--fsdp with LoRA (--lora-r) is not supported; use DDP (leave out --fsdp) for LoRA")
        if self.pair_maps and not policy.routes:
            raise ValueError("--pair-maps needs a routing policy that routes (rcla, cla:K, rdcla:K, plan:SPEC), "
                             "not --routing none")
        if self.pair_maps and self.lora_r:
            raise ValueError("--pair-maps with LoRA (--lora-r) is not supported; fine-tune fully")
        if self.maps_only and not self.pair_maps:
            raise ValueError("--maps-only trains the pairwise maps alone: add --pair-maps")
        if self.pair_lr is not None and self.pair_lr <= 0:
            raise ValueError(f"--pair-lr must be positive, got {self.pair_lr}")
        if not parse_plan_list(self.eval_plans):
            raise ValueError("--eval-plans: give at least one plan, e.g. full,every:2")

    @property
    def policy(self) -> RoutingPolicy:
        return policy_from_spec(self.routing, p=self.p, sources=self.sources)

    @property
    def _qa_sources(self) -> list[str]:
        return [s for s in self.data if s.endswith(".jsonl")]

    @property
    def data_kind(self) -> str:
        """``text``, ``qa`` or ``mix``: what ``--data`` holds, ``data_format`` resolved.

        ``auto``: QA when every file source is ``.jsonl`` (``hf:`` datasets then count as QA),
        text when none is, a mix otherwise (``hf:`` datasets then count as text).
        """
        if self.data_format != "auto":
            return self.data_format
        files = [s for s in self.data if not s.startswith("hf:")]
        qa = len(self._qa_sources)
        return "text" if qa == 0 else "qa" if qa == len(files) else "mix"


@dataclass
class StepInfo:
    """What one optimizer step did; handed to callbacks and written to the metrics."""

    step: int
    loss: float
    lm_loss: float
    distill: float
    lr: float
    grad_norm: float | None
    tokens: int
    tok_per_s: float
    routes: list[tuple[int, ...]] = field(default_factory=list)
    distill_hidden: float = 0.0


@dataclass
class TrainResult:
    output_dir: Path
    final_checkpoint: Path
    steps: int
    losses: list[float]
    eval_loss: dict[str, float]
    main_process: bool = True


def _flag(name: str) -> str:
    return "--" + {"preset": "config"}.get(name, name).replace("_", "-")


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{_flag(name)} must be a positive integer, got {value}")


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{_flag(name)} must be one of {', '.join(options)}, got {value!r}")


# ----------------------------------------------------------------------------- losses
def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over labels != -100 (``mean`` or ``sum``). logits: (B, T, V); labels: (B, T)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
               reduction: str = "mean") -> torch.Tensor:
    """KL(teacher || student) over the positions the LM loss counts (``mean`` or ``sum``). logits: (B, T, V)."""
    mask = labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
    s = student_logits[:, :-1][mask].float().log_softmax(-1)  # (N, V)
    t = teacher_logits[:, :-1][mask].float().log_softmax(-1)
    kl = (t.exp() * (t - s)).sum(-1)
    return kl.sum() if reduction == "sum" else kl.mean()


def hidden_distill(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], labels: torch.Tensor,
                   reduction: str = "mean") -> torch.Tensor:
    """Layer-wise hidden-state distillation over the positions the LM loss counts (``mean`` or ``sum``).

    Per position: ``||h_s - h_t||^2 / ||h_t||^2`` of each decoder layer's output (the embeddings
    are skipped), averaged over the layers. student, teacher: ``output_hidden_states`` tuples of
    ``(B, T, hidden)``; labels: ``(B, T)``.
    """
    if len(student) != len(teacher):
        raise ValueError(f"hidden-state distillation: the student has {len(student) - 1} layers, "
                         f"the teacher {len(teacher) - 1}")
    mask = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): the positions whose next token is scored
    per_token = 0.0
    for s, t in zip(student[1:], teacher[1:]):
        s, t = s[:, :-1][mask].float(), t[:, :-1][mask].float()  # (N, hidden)
        per_token = per_token + (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-6)
    per_token = per_token / (len(student) - 1)
    return per_token.sum() if reduction == "sum" else per_token.mean()


def labelled_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The tokens a batch's losses count: next-token positions whose label is not -100."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@contextlib.contextmanager
def _policy(router: Any, policy: RoutingPolicy):
    saved = router.policy
    router.policy = policy
    try:
        yield
    finally:
        router.policy = saved


# ----------------------------------------------------------------------------- schedule
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


# ----------------------------------------------------------------------------- setup
def _check_inputs(config: TrainConfig):
    """Every check that needs files but not the weights: returns the model config (or None)."""
    from kvroute.models import load_config

    qa, text = _split_sources(config)
    for sources, suffixes in ((qa, (".jsonl",)), (text, TEXT_SUFFIXES)):
        resolve_files(sources, suffixes=suffixes)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if config.resume not in (None, "latest") and not Path(config.resume).is_dir():
        raise FileNotFoundError(f"--resume: checkpoint not found: {config.resume}")
    if config.model is None:
        return None
    model_config = load_config(config.model)
    text_config = model_config.get_text_config(decoder=True)
    limit = getattr(text_config, "max_position_embeddings", None)
    if limit is not None and config.seq_len > limit:
        raise ValueError(f"--seq-len {config.seq_len} is above the model's maximum of {limit} positions")
    _check_routing(config, text_config)
    return model_config


def _check_routing(config: TrainConfig, model_config: Any) -> None:
    """The policy, the default plan and the eval plans fit the model."""
    shape = KVShape.from_config(model_config)
    try:
        config.policy.served_plan(shape.num_layers, shape.layer_types)
    except ValueError as err:
        raise ValueError(f"--routing: {err}") from None
    for spec in [config.plan, *parse_plan_list(config.eval_plans)]:
        SharingPlan.for_model(spec, model_config)


def _split_sources(config: TrainConfig) -> tuple[list[str], list[str]]:
    """``--data`` as (QA sources, text sources)."""
    kind = config.data_kind
    if kind == "mix":
        qa = config._qa_sources
        return qa, [s for s in config.data if s not in qa]
    return (config.data, []) if kind == "qa" else ([], config.data)


def _load_data(config: TrainConfig, tokenizer: Any):
    """(train, val, collate): packed text, QA examples, or a :class:`Mixture` of both."""
    qa_sources, text_sources = _split_sources(config)
    parts: list[tuple[Any, Any]] = []
    if text_sources:
        parts.append(load_text(text_sources, tokenizer, config.seq_len, config.val_fraction, config.cache_dir))
    if qa_sources:
        train_ds, val_ds = load_qa(qa_sources, tokenizer, config.seq_len, config.val_fraction, config.seed)
        for ds in (train_ds, val_ds):
            ds.question_first_p = config.question_first_p
        parts.append((train_ds, val_ds))
    if len(parts) == 1:
        train_ds, val_ds = parts[0]
        return train_ds, val_ds, collate_blocks if text_sources else QACollator(tokenizer.pad_token_id)
    return (Mixture([p[0] for p in parts]), Mixture([p[1] for p in parts]), QACollator(tokenizer.pad_token_id))


def _carry_calibration(model: torch.nn.Module, folder: str | Path) -> None:
    """With ``plan:SPEC`` routing, keep the starting checkpoint's calibration of that plan
    (``kvroute calibrate``): every step routes as the plan does, so its maps act on every step
    and are saved with every checkpoint. The maps stay fixed; the weights learn around them.
    Other calibrations would go stale as the weights change, so they are not carried."""
    from kvroute.calibrate import load_calibration, remove_calibration

    router = get_router(model)
    shape = KVShape.from_config(model.config)
    served = router.policy.served_plan(shape.num_layers, shape.layer_types)
    if served is None or not Path(str(folder)).is_dir():
        return
    for source in load_calibration(model, folder):
        if source != served.source:
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


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    from kvroute.pairs import PAIRS_PREFIX

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    pairs = [p for n, p in named if PAIRS_PREFIX in n]  # near the identity or a fit: never decayed to 0
    params = [p for n, p in named if PAIRS_PREFIX not in n]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if pairs:
        groups.append({"params": pairs, "weight_decay": 0.0, "lr": config.pair_lr or config.lr})
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


class _Batches:
    """Deterministic batches: a seeded permutation per epoch, sharded over processes.

    Micro-batch ``k`` is a pure function of (seed, k), so a run resumes by its counter.
    """

    def __init__(self, dataset, collate, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.dataset, self.collate, self.batch_size = dataset, collate, batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.per_epoch = len(dataset) // (batch_size * world)
        if self.per_epoch == 0:
            raise ValueError(
                f"--data gives {len(dataset)} training examples, fewer than one batch of "
                f"--batch-size {batch_size} x {world} process(es); add data or lower --batch-size/--seq-len"
            )
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def __call__(self, micro: int) -> dict[str, torch.Tensor]:
        epoch, index = divmod(micro, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(len(self.dataset), generator=gen)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
        start = (index * self.world + self.rank) * self.batch_size
        return self.collate([self.dataset[int(i)] for i in self._perm[start:start + self.batch_size]])


def _forward_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return _forward(model, batch).logits


def _forward(model, batch: dict[str, torch.Tensor], hidden: bool = False) -> Any:
    """The model's output on ``batch`` (with every layer's hidden states when ``hidden``)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False,
                 output_hidden_states=hidden)


@torch.no_grad()
def evaluate_plans(model, plain, val_batches: list[dict[str, torch.Tensor]], plans: list[str],
                   autocast: Callable = contextlib.nullcontext) -> dict[str, float]:
    """Mean validation loss per plan (eval mode), then back to training mode and the saved plan.

    Args:
        model: the model to call (possibly wrapped by DDP/FSDP).
        plain: the same model unwrapped (a routed transformers model).
        val_batches: batches with ``input_ids``, ``labels`` (and ``attention_mask``).
        plans: plan specs, e.g. ``["full", "every:2"]``.

    Every process evaluates all ``val_batches`` (a few), so wrapped models see the
    same forward calls on every rank. A model trained for one plan (``plan:SPEC``) is
    measured under the others without a warning: they were asked for.
    """
    train_plan = get_router(plain).plan
    device = next(plain.parameters()).device
    model.eval()
    out: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PlanMismatchWarning)
        try:
            for spec in plans:
                set_plan(plain, spec)
                total = torch.zeros(2, dtype=torch.float64)  # summed token loss, tokens
                for batch in val_batches:
                    batch = {k: v.to(device) for k, v in batch.items()}
                    n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
                    with autocast():
                        logits = _forward_logits(model, batch)
                    total += torch.stack([causal_lm_loss(logits, batch["labels"], "sum").double(), n.double()]).cpu()
                out[spec] = float(total[0] / total[1].clamp(min=1))
        finally:
            set_plan(plain, train_plan)
            model.train()
    return out


#: settings a resumed run must share with its checkpoint (else the data order or weights differ).
RESUME_FIXED = ("data", "data_format", "model", "preset", "layers", "tokenizer", "seq_len", "batch_size",
                "grad_accum", "seed", "routing", "p", "sources", "lora_r", "lora_targets", "val_fraction", "fsdp",
                "pair_maps", "maps_only")


class _Run:
    """The pieces of one training run and the three things it does: step, evaluate, save."""

    def __init__(self, config: TrainConfig) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        from kvroute.models import load_model, load_tokenizer

        _check_inputs(config)
        self.config = c = config
        self.tokenizer = load_tokenizer(c.tokenizer or c.model)
        train_ds, val_ds, collate = _load_data(c, self.tokenizer)
        self.sizes = (len(train_ds), len(val_ds))
        policy = c.policy
        # bf16 is plain autocast: Accelerate's mixed precision is fixed once per process
        self.accelerator = acc = Accelerator(cpu=c.device == "cpu", kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=policy.routes)])
        if c.device == "cuda" and acc.device.type != "cuda":
            raise ValueError("--device cuda: Accelerate was already set up on the CPU in this process "
                             "(an earlier device='cpu' run); start a new process")
        self.main = acc.is_main_process
        if not self.main:  # one process reports (the CLI's --quiet silences the libraries on all of them)
            from kvroute.cli import quiet_libraries

            quiet_libraries()
        self.fsdp = c.fsdp
        if c.fsdp:
            sharding.require_process_group()
        self.batches = _Batches(train_ds, collate, c.batch_size, c.seed, acc.process_index, acc.num_processes)
        self.val_batches = [collate([val_ds[i] for i in range(s, min(s + c.batch_size, len(val_ds)))])
                            for s in range(0, len(val_ds), c.batch_size)][: c.eval_batches]
        self.out_dir = Path(c.output_dir)
        self.resume_dir = None
        if c.resume is not None:
            self.resume_dir = latest_checkpoint(self.ckpt_root) if c.resume == "latest" else Path(c.resume)

        _seed_everything(c.seed)  # LoRA initialisation and dropout follow --seed
        model = _starting_model(c, self.tokenizer)
        distill_base = (c.distill > 0 or c.distill_hidden > 0) and c.distill_from == "base"
        self.base = None  # frozen teacher; with LoRA the model itself with its adapters off
        if distill_base and c.lora_r == 0:
            self.base = _frozen_teacher(model, acc.device, c.fsdp)
        self.adapters_off_teacher = distill_base and c.lora_r > 0
        if self.resume_dir is not None and c.lora_r == 0:
            model = load_model(self.resume_dir)
        model = apply(model, policy=policy, plan=c.plan, seed=c.seed)
        start = self.resume_dir if self.resume_dir is not None and c.lora_r == 0 else c.model
        _carry_calibration(model, start)
        if c.pair_maps:
            _start_pair_maps(model, start, self.main)
        if c.maps_only:
            from kvroute.pairs import PAIRS_PREFIX

            for name, param in model.named_parameters():
                param.requires_grad_(PAIRS_PREFIX in name)
        if c.gradient_checkpointing:  # non-reentrant: the reentrant kind drops cross-layer KV gradients
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if c.lora_r > 0:
            model = _add_lora(model, c)
        self.router = get_router(model)
        if c.fsdp:  # torch's FSDP2 on the model in place; Accelerate only runs the processes
            self.model = self.plain = sharding.shard(model, acc.device)
            self.optimizer = _optimizer(self.model, c)
        else:
            self.model, self.optimizer = acc.prepare(model, _optimizer(model, c))
            self.plain = acc.unwrap_model(self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule())
        self.step, self.micro = 0, 0
        self.precision = resolve_precision(c.precision, acc.device)  # "auto" -> what this device runs

    @property
    def ckpt_root(self) -> Path:
        return Path(self.config.output_dir) / "checkpoints"

    def schedule(self) -> LRSchedule:
        c = self.config
        return LRSchedule(c.max_steps, math.ceil(c.warmup * c.max_steps), c.schedule, c.min_lr_ratio)

    def autocast(self):
        return autocast(self.precision, self.accelerator.device)

    def restore(self, folder: Path) -> None:
        state = load_training_state(folder)
        saved = state.get("config", {})
        for name in RESUME_FIXED:
            old, new = saved.get(name), asdict(self.config)[name]
            if name in saved and (list(old) if isinstance(old, tuple) else old) != new:
                raise ValueError(
                    f"--resume: {folder} was trained with {_flag(name)} {old!r}, this run asks for {new!r}; "
                    "resume with the same settings"
                )
        processes = state.get("processes", 1)
        if processes != self.accelerator.num_processes:
            raise ValueError(
                f"--resume: {folder} was written by {processes} process(es), this run has "
                f"{self.accelerator.num_processes}; the data order and the global batch depend on it, so "
                f"resume on {processes} process(es)"
            )
        self.step, self.micro = state["step"], state["micro"]
        if self.fsdp:
            sharding.load_sharded(self.model, self.optimizer, folder / STATE_DIR)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scheduler.lr_lambdas = [self.schedule()] * len(self.scheduler.lr_lambdas)  # this run's --max-steps
        self.router.load_state_dict(state["router"])
        if state.get("trainable"):
            self.plain.load_state_dict(state["trainable"], strict=False)
        _set_rng(state["rng"])

    def train_step(self) -> StepInfo:
        """One optimizer step over ``grad_accum`` micro-batches; each forward draws its own route.

        Losses are token-exact: the summed token losses (LM and distillation) of every
        micro-batch on every process are divided by the labelled tokens of the whole window,
        so ``--grad-accum k`` and ``k`` processes optimise what one batch ``k`` times larger would.
        """
        c, acc, model = self.config, self.accelerator, self.model
        t0 = time.perf_counter()
        batches = [{key: v.to(acc.device) for key, v in self.batches(self.micro + k).items()}
                   for k in range(c.grad_accum)]
        self.micro += c.grad_accum
        counted = self._sum(torch.tensor([float(sum(labelled_tokens(b) for b in batches))], device=acc.device))
        scale = acc.num_processes / float(counted.clamp(min=1))  # ranks' gradients are averaged
        sums = torch.zeros(4, device=acc.device)  # summed token losses: loss, lm, distill, distill_hidden
        hidden = c.distill_hidden > 0
        tokens, routes = 0, []
        for k, batch in enumerate(batches):
            last = k == c.grad_accum - 1
            sharding.set_gradient_sync(model, last)
            with contextlib.nullcontext() if last or self.fsdp else acc.no_sync(model):
                with self.autocast():
                    out = _forward(model, batch, hidden)  # draws the route
                logits = out.logits
                route = self.router.last_route
                routes.append(route)
                lm = causal_lm_loss(logits, batch["labels"], reduction="sum")
                dist = torch.zeros((), device=lm.device)
                dist_hidden = torch.zeros((), device=lm.device)
                if (c.distill > 0 or hidden) and route != tuple(range(len(route))):  # only routed passes
                    teacher = self.teacher(batch, hidden)
                    if c.distill > 0:
                        dist = distill_kl(logits, teacher.logits, batch["labels"], reduction="sum")
                    if hidden:
                        dist_hidden = hidden_distill(out.hidden_states, teacher.hidden_states, batch["labels"],
                                                     reduction="sum")
                loss = lm + c.distill * dist + c.distill_hidden * dist_hidden
                acc.backward(loss * scale)
            sums += torch.stack([loss.detach(), lm.detach(), dist.detach(), dist_hidden.detach()])
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        grad_norm = None
        if c.grad_clip > 0:
            grad_norm = (sharding.clip_grad_norm(model, c.grad_clip) if self.fsdp
                         else float(acc.clip_grad_norm_(model.parameters(), c.grad_clip)))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._check_same_routes(routes)
        totals = self._sum(sums) / counted.clamp(min=1)
        tokens *= acc.num_processes
        elapsed = max(time.perf_counter() - t0, 1e-9)
        return StepInfo(self.step, float(totals[0]), float(totals[1]), float(totals[2]), lr, grad_norm,
                        tokens, tokens / elapsed, routes, float(totals[3]))

    def _check_same_routes(self, routes: list[tuple[int, ...]]) -> None:
        """Every process must have drawn the same routes (the same seed, the same number of passes)."""
        if self.accelerator.num_processes == 1:
            return
        code = torch.tensor([float(zlib.crc32(repr(routes).encode()))], dtype=torch.float64, device=self.accelerator.device)
        if len(set(self.accelerator.gather(code).tolist())) > 1:
            raise RuntimeError(f"kvroute: processes drew different routes at step {self.step}; every process "
                               "must run the same kvroute version, --seed and number of forward passes")

    def _sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over all processes."""
        return self.accelerator.reduce(values.clone(), "sum") if self.accelerator.num_processes > 1 else values

    def teacher(self, batch: dict[str, torch.Tensor], hidden: bool = False) -> Any:
        """The unrouted output: the frozen base copy, else the model itself with the identity route.

        Routes are equal on all ranks, so all ranks make this call alike (DDP-safe).
        """
        with torch.no_grad(), self.autocast():
            if self.base is not None:
                return _forward(self.base, batch, hidden)
            off = self.plain.disable_adapter() if self.adapters_off_teacher else contextlib.nullcontext()
            with _policy(self.router, NoRouting()), off:
                return _forward(self.model, batch, hidden)

    def evaluate(self) -> dict[str, float]:
        return evaluate_plans(self.model, self.plain, self.val_batches, parse_plan_list(self.config.eval_plans),
                              self.autocast)

    def save(self, folder: Path, training_state: bool) -> None:
        """Weights + tokenizer (atomic), then the training state (renamed into place last).

        Under ``--fsdp`` every process gathers the weights for the main one to write, and each
        writes its own shards of weights and optimizer state into the training state.
        """
        from kvroute.models import save_checkpoint

        acc, c = self.accelerator, self.config
        acc.wait_for_everyone()
        gathered = sharding.full_state_dict(self.model) if self.fsdp else None
        if self.main:
            save_checkpoint(copy.deepcopy(self.plain).merge_and_unload() if c.lora_r else self.plain,
                            folder, self.tokenizer, state_dict=gathered)
        del gathered
        if training_state:
            if self.main:
                stage_training_state(folder)
            acc.wait_for_everyone()
            if self.fsdp:
                sharding.save_sharded(self.model, self.optimizer, staging_dir(folder))
                acc.wait_for_everyone()
            if self.main:
                lora = {k: v for k, v in self.plain.state_dict().items() if "lora_" in k} if c.lora_r else None
                commit_training_state(folder, {
                    "step": self.step, "micro": self.micro,
                    "optimizer": None if self.fsdp else self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "router": self.router.state_dict(),
                    "rng": _get_rng(), "trainable": lora, "config": asdict(c),
                    "processes": acc.num_processes,
                }, keep=c.keep_checkpoints)
        acc.wait_for_everyone()


def train(config: TrainConfig, callbacks: list[Callable[[StepInfo], None]] | None = None) -> TrainResult:
    """Train with the configured routing policy; write checkpoints, metrics and ``final/``.

    Args:
        config: the run.
        callbacks: called with a :class:`StepInfo` after every optimizer step (main process).

    Returns:
        Where things went, this run's per-step losses and the last eval loss per plan.

    Raises:
        FileNotFoundError, ValueError: for bad inputs, before any training work.
    """
    from tqdm.auto import tqdm

    run = _Run(config)
    c = config
    say = (lambda msg: tqdm.write(msg)) if run.main and not c.quiet else (lambda msg: None)
    if run.main:
        for path in remove_partial_checkpoints(run.ckpt_root):  # left by a run killed while saving
            say(f"removed a partial checkpoint left by a killed run: {path}")
    if run.resume_dir is not None:
        run.restore(run.resume_dir)
        say(f"resumed from {run.resume_dir} at step {run.step}")
    elif c.resume is not None:
        say(f"--resume: no complete checkpoint in {run.ckpt_root}; starting from step 0")
    log = MetricsLog(run.out_dir, tensorboard=c.tensorboard and run.main, enabled=run.main,
                     truncate_after=run.step)
    if run.main:
        (run.out_dir / "run_config.json").write_text(json.dumps(
            {**asdict(c), "precision_resolved": run.precision}, indent=2) + "\n")
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    say(f"kvroute train: routing {c.policy.spec}, {run.router.plan.describe()}, {trainable / 1e6:.2f}M "
        f"trainable params, {run.sizes[0]} train / {run.sizes[1]} val examples, device {run.accelerator.device}, "
        f"precision {run.precision}")

    eval_loss: dict[str, float] = {}

    def evaluate() -> None:
        nonlocal eval_loss
        eval_loss = run.evaluate()
        log.eval(run.step, eval_loss)
        say(f"step {run.step} eval " + "  ".join(
            f"{spec}: loss {loss:.3f} ppl {math.exp(min(loss, 50)):.1f}" for spec, loss in eval_loss.items()))

    do_eval = bool(c.eval_every and run.val_batches)
    if do_eval and run.step == 0:
        evaluate()
    losses: list[float] = []
    bar = tqdm(total=c.max_steps, initial=run.step, disable=not run.main or c.quiet, desc="train")
    run.model.train()
    while run.step < c.max_steps:
        info = run.train_step()
        losses.append(info.loss)
        if run.main:
            if info.step % c.log_every == 0 or info.step == c.max_steps:
                log.step(info)
            bar.update(1)
            bar.set_postfix(loss=f"{info.loss:.3f}", lr=f"{info.lr:.2e}", tok_s=f"{info.tok_per_s:.0f}")
            for callback in callbacks or []:
                callback(info)
        if do_eval and (info.step % c.eval_every == 0 or info.step == c.max_steps):
            evaluate()
        if c.save_every and info.step % c.save_every == 0 and info.step < c.max_steps:
            run.save(run.ckpt_root / f"step-{info.step:06d}", training_state=True)
    bar.close()
    final = run.out_dir / "final"
    run.save(final, training_state=False)
    say(f"saved {final}")
    log.close()
    return TrainResult(run.out_dir, final, run.step, losses, eval_loss, run.main)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _frozen_teacher(model: torch.nn.Module, device: torch.device, fsdp: bool) -> torch.nn.Module:
    """A frozen copy of the starting model under the full cache (``--distill-from base``)."""
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    if is_routed(teacher):  # a routed start keeps its saved plan; the teacher reads every layer's own KV
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PlanMismatchWarning)
            set_plan(teacher, "full")
    return sharding.shard(teacher, device) if fsdp else teacher.to(device)


def _get_rng() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
