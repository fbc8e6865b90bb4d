"""The training run's settings: :class:`TrainConfig`, validated on construction, and the
checks that need files but not the weights (:func:`_check_inputs`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from kvroute.data.text import TEXT_SUFFIXES, resolve_files
from kvroute.plan import KVShape, SharingPlan, parse_plan_list
from kvroute.policy import RoutingPolicy, Sources, policy_from_spec
from kvroute.precision import PRECISIONS, Precision
from kvroute.shapes import PRESETS, check_preset_fields

Schedule = Literal["cosine", "linear", "constant"]
DataFormat = Literal["auto", "text", "qa", "mix"]
Device = Literal["auto", "cpu", "cuda"]
Teacher = Literal["self", "base"]
RolloutPrompts = Literal["all", "text"]
SCHEDULES = get_args(Schedule)
DATA_FORMATS = get_args(DataFormat)


@dataclass
class TrainConfig:
    """Everything a training run needs; validated on construction (errors name the CLI flag).

    Args:
        data: text files, folders, globs, ``hf:NAME[:CONFIG][@SPLIT]`` datasets, or ``.jsonl`` QA files
            (text and ``.jsonl`` together: a mixture).
        output_dir: run folder: checkpoints, metrics and the final model go here.
        model: hub id, folder or ``.gguf`` file to fine-tune (exclusive with ``preset``).
        preset: a :data:`kvroute.shapes.PRESETS` name to pre-train from scratch, or (from Python or a
            config file) a preset definition: a dict of ``Qwen3Config`` fields, like the table's entries.
        layers: depth override for ``preset``.
        tokenizer: tokenizer source; default: ``model`` (required with ``preset``).
        data_format: ``text``, ``qa``, ``mix`` or ``auto`` (QA when every source is a ``.jsonl`` file,
            a mix when some are: ``.jsonl`` sources are QA, the others text).
        routing: ``rcla``, ``cla:K``, ``rdcla:K``, ``none`` or ``plan:SPEC`` (train for that one plan,
            any spec: ``plan:every:2``, ``plan:layers:0,3,7``; the model then serves it only; several
            joined by ``+``, ``plan:full+every:2+every:4``, are drawn uniformly, one per pass; a
            weight draws a plan more often: ``plan:every:2+3*every:4``), or ``mix:A|B|...``: each pass
            draws one of several policies (``mix:rcla:p=0.6,sources=plan|plan:every:2+every:4``: R-CLA
            on half the passes, the plans you expect to deploy on the other half; serves any plan).
        p: probability a layer keeps its own KV (rcla, rdcla); None: the policy's default (0.6).
        sources: rcla source draw: ``uniform`` (paper, default), ``nearest`` (geometric distance) or
            ``plan`` (a random owner set; non-owners read the nearest earlier owner).
        plan: default inference plan saved with the checkpoints; None: SPEC for ``plan:SPEC``
            routing (its first plan), else ``full``.
        eval_plans: comma-separated plans the eval loss is measured under.
        seq_len: tokens per training sequence.
        batch_size: sequences per micro-batch, per process.
        grad_accum: micro-batches per optimizer step.
        max_steps: optimizer steps.
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay of the matrices.
        betas: AdamW betas.
        grad_clip: gradient norm clip (0 disables).
        warmup: linear warm-up, as a fraction of ``max_steps``.
        schedule: learning rate after the warm-up: ``cosine``, ``linear`` or ``constant``.
        min_lr_ratio: where the decay ends, as a fraction of ``lr``.
        precision: ``bf16`` (autocast), ``fp32``, or ``auto``: bf16 where the device runs it natively
            (CUDA with bf16, CPUs with AMX/AVX512-BF16), else fp32 (:mod:`kvroute.precision`).
        gradient_checkpointing: recompute activations in the backward pass (less memory).
        seed: data order, initialisation, dropout and routes.
        device: ``auto``, ``cpu`` or ``cuda``.
        lora_r: LoRA rank (0: full fine-tuning).
        fsdp: shard weights, gradients and optimizer state over the processes (FSDP2; launch with
            ``torchrun`` or ``accelerate launch``); checkpoints are then sharded (torch distributed checkpoint).
        lora_alpha: LoRA scaling numerator.
        lora_dropout: LoRA dropout.
        lora_targets: comma-separated module names LoRA adapts.
        distill: weight of KL(teacher || routed student) on routed passes (0: off).
        distill_hidden: weight of layer-wise hidden-state distillation on routed passes (0: off):
            each decoder layer's output under the route is pulled to the teacher's (full cache),
            as a squared error relative to the teacher's norm, averaged over layers. It uses the
            same teacher as ``distill`` (``distill_from``).
        distill_from: teacher: ``self`` (the same model, unrouted) or ``base`` (frozen start).
        unlikelihood: weight of token-level unlikelihood against repetition (0: off; Welleck et al.,
            2019): at each scored position, tokens that earlier scored positions of the row had as
            targets, other than its own, are pushed down by ``-log(1 - p)``. On QA records only
            the answer is scored, so copying from the context is not penalised.
        seq_unlikelihood: weight of sequence-level unlikelihood on the model's own greedy text (0: off;
            :mod:`kvroute.train.rollouts`). Each micro-batch continues the first ``seq_ul_prefix``
            tokens of its rows greedily for ``seq_ul_length`` tokens under the plan it drew, through
            the plan's cache, then pushes down every continuation token that repeats an n-gram of
            ``seq_ul_ngram`` tokens, per continuation token. Needs ``plan:SPEC`` routing, or a mix
            with a ``plan:`` part: the rollouts run under the plans the model will serve, so in a mix
            only the micro-batches that draw one of those plans roll out.
        seq_distill: weight of on-policy distillation on the same greedy rollouts (0: off): at each
            continuation token up to and including the first that repeats an n-gram, KL(teacher ||
            routed student), the teacher (``distill_from``) reading the full cache over the text the
            student wrote under the plan. Sequence-level unlikelihood only pushes repeats down; this
            says what to write instead. It rolls out as ``seq_unlikelihood`` does (the same
            ``seq_ul_*`` settings and routing needs), per continuation token.
        seq_ul_prefix: prompt tokens of each rollout; padded rows (QA) with fewer tokens do not roll out.
        seq_ul_prompts: which rows prompt rollouts: ``all``, or ``text``: only rows whose first
            ``seq_ul_prefix`` tokens are all trained on (running text; a QA record's context is not),
            so that with QA records in the mix the rollouts continue prose, not QA contexts.
        seq_ul_per_row: rollout prompts per row: ``K`` prompts of ``seq_ul_prefix`` tokens start at
            ``0, seq_len // K, 2 * seq_len // K, ...`` (``seq_ul_prompts`` and padding apply to each).
            Decoding is memory-bound, so on a CPU 16 rollouts decode in about 1.7x the time of 4;
            training on them grows with their number (with 4 a row, a step took 1.3-1.6x as long).
        seq_ul_length: greedy tokens per rollout.
        seq_ul_ngram: a continuation token is pushed down when it is part of an n-gram this long
            that the row already had.
        pair_maps: train pairwise maps (:mod:`kvroute.pairs`) with the routes: whenever a route
            makes layer l read layer o's KV, the (l, o) maps apply and learn. They start from the
            checkpoint's own (``kvroute calibrate --pairs``), else from the identity, and are saved
            with every checkpoint, so every plan the model serves uses them.
        pair_lr: learning rate of the pairwise maps (None: ``lr``); no weight decay applies to them.
        maps_only: with ``pair_maps``, train only the maps; the model's weights stay frozen (a
            calibration for every plan at once, trained on the routes the policy draws).
        val_fraction: share of the data held out for the eval loss.
        question_first_p: QA: probability the question comes before the context.
        eval_every: eval loss every N steps (0 disables).
        eval_batches: validation batches per eval.
        save_every: resumable checkpoint every N steps (0: the final model only).
        keep_checkpoints: newest checkpoints kept (0 keeps all).
        log_every: metrics record every N steps.
        resume: ``latest`` or a checkpoint folder to continue from.
        tensorboard: write TensorBoard events too.
        cache_dir: token cache (default ``~/.cache/kvroute/tokens``).
        quiet: no progress bars or notices.
    """

    data: list[str]
    output_dir: str = "runs/kvroute"
    model: str | None = None
    preset: str | dict[str, Any] | None = None
    layers: int | None = None
    tokenizer: str | None = None
    data_format: DataFormat = "auto"
    routing: str = "rcla"
    p: float | None = None
    sources: Sources | None = None
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
    schedule: Schedule = "cosine"
    min_lr_ratio: float = 0.0
    precision: Precision = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0
    device: Device = "auto"
    lora_r: int = 0
    fsdp: bool = False
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"
    distill: float = 0.0
    distill_hidden: float = 0.0
    distill_from: Teacher = "self"
    unlikelihood: float = 0.0
    seq_unlikelihood: float = 0.0
    seq_distill: float = 0.0
    seq_ul_prefix: int = 32
    seq_ul_prompts: RolloutPrompts = "all"
    seq_ul_per_row: int = 1
    seq_ul_length: int = 48
    seq_ul_ngram: int = 4
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
            raise ValueError("give a model to fine-tune or --preset NAME to train from scratch (exactly one)")
        if self.preset is not None:
            if isinstance(self.preset, dict):
                check_preset_fields(self.preset)
            elif self.preset not in PRESETS:
                raise ValueError(f"--preset: unknown preset {self.preset!r}; expected one of {', '.join(PRESETS)}")
            if self.tokenizer is None:
                raise ValueError("--preset needs --tokenizer (a hub id or folder) for its vocabulary")
        if self.layers is not None:
            if self.preset is None:
                raise ValueError("--layers only applies to --preset (a pretrained model keeps its depth)")
            _positive("layers", self.layers)
        if self.p is not None and not 0.0 <= float(self.p) <= 1.0:
            raise ValueError(f"--p must be in [0, 1] (probability a layer keeps its own KV), got {self.p}")
        try:
            policy = self.policy
        except ValueError as err:
            raise ValueError(f"--routing: {err}") from None
        if self.plan is None:
            self.plan = policy.plans[0] if policy.plans else "full"
        _choice("data_format", self.data_format, DATA_FORMATS)
        if self.data_kind == "mix" and not 0 < len(self._qa_sources) < len(self.data):
            raise ValueError("--data-format mix needs both .jsonl QA files and text sources in --data")
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("device", self.device, get_args(Device))
        _choice("distill_from", self.distill_from, get_args(Teacher))
        _choice("seq_ul_prompts", self.seq_ul_prompts, get_args(RolloutPrompts))
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_batches", "log_every",
                     "seq_ul_prefix", "seq_ul_per_row", "seq_ul_length", "seq_ul_ngram"):
            _positive(name, getattr(self, name))
        for name in ("eval_every", "save_every", "keep_checkpoints", "lora_r"):
            if getattr(self, name) < 0:
                raise ValueError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        for name in ("weight_decay", "grad_clip", "distill", "distill_hidden", "unlikelihood", "seq_unlikelihood",
                     "seq_distill"):
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
        rollouts = self.rollouts
        if rollouts and not policy.drawn_plans:
            raise ValueError(f"{rollouts} trains on greedy text written under the plans the model will "
                             f"serve: it needs --routing plan:SPEC (e.g. plan:every:2+every:4) or a mix with a "
                             f"plan: part (e.g. mix:rcla|plan:every:2), not {policy.spec!r}")
        if rollouts and self.seq_ul_prefix >= self.seq_len:
            raise ValueError(f"--seq-ul-prefix {self.seq_ul_prefix} must be shorter than --seq-len {self.seq_len}: "
                             "the rollouts start from the first tokens of each training row")
        if rollouts and self.rollout_offsets[-1] + self.seq_ul_prefix > self.seq_len:
            raise ValueError(f"--seq-ul-per-row {self.seq_ul_per_row} prompts of --seq-ul-prefix {self.seq_ul_prefix} "
                             f"tokens start at {list(self.rollout_offsets)}: the last does not fit in --seq-len "
                             f"{self.seq_len}; use fewer or shorter prompts")
        if rollouts and self.seq_ul_prompts == "text" and self.data_kind == "qa":
            raise ValueError("--seq-ul-prompts text rolls out from running text, and --data holds QA records "
                             "only; add text sources or use --seq-ul-prompts all")
        if self.pair_maps and not policy.routes:
            raise ValueError("--pair-maps needs a routing policy that routes (rcla, cla:K, rdcla:K, plan:SPEC, mix), "
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
    def rollout_offsets(self) -> tuple[int, ...]:
        """Where each row's rollout prompts start (``seq_ul_per_row`` of them, evenly spaced)."""
        return tuple(k * (self.seq_len // self.seq_ul_per_row) for k in range(self.seq_ul_per_row))

    @property
    def rollouts(self) -> str:
        """The flags that train on greedy rollouts under the plans (``--seq-unlikelihood``, ``--seq-distill``),
        joined by `` and ``; empty when neither is on."""
        return " and ".join(_flag(n) for n in ("seq_unlikelihood", "seq_distill") if getattr(self, n) > 0)

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


#: settings that change only what a run reports, saves or resumes from, never the weights it trains.
REPORTING_ONLY = ("eval_plans", "eval_every", "eval_batches", "save_every", "keep_checkpoints", "log_every", "resume",
                  "tensorboard", "cache_dir", "quiet")

#: settings a resumed run must share with its checkpoint (else the data order or weights differ).
RESUME_FIXED = ("data", "data_format", "model", "preset", "layers", "tokenizer", "seq_len", "batch_size",
                "grad_accum", "seed", "routing", "p", "sources", "lora_r", "lora_targets", "val_fraction", "fsdp",
                "pair_maps", "maps_only")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{_flag(name)} must be a positive integer, got {value}")


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{_flag(name)} must be one of {', '.join(options)}, got {value!r}")


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
    rollout = config.seq_ul_prefix + config.seq_ul_length
    if config.rollouts and limit is not None and rollout > limit:
        raise ValueError(f"--seq-ul-prefix + --seq-ul-length = {rollout} is above the model's maximum of "
                         f"{limit} positions")
    _check_routing(config, text_config)
    return model_config


def _check_routing(config: TrainConfig, model_config: Any) -> None:
    """The policy, the default plan and the eval plans fit the model."""
    shape = KVShape.from_config(model_config)
    try:
        config.policy.served_plans(shape.num_layers, shape.layer_types)
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
