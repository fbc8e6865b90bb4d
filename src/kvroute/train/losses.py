"""Losses: next-token LM loss (answer-only where labels mask the prompt with -100), distillation
(KL on logits, layer-wise on hidden states), unlikelihood against repetition, and the loss under a
plan (:func:`mean_loss`)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable
from typing import Any, Callable

import torch

from kvroute.data.qa import IGNORE_INDEX
from kvroute.hf.patch import ROUTE_ARG, PlanMismatchWarning, get_router, set_plan


#: fp32 bytes per chunk of the vocabulary-sized loss work: on a CPU a chunk stays in cache (32 positions of
#: SmolLM2's 49,152 tokens); on an accelerator chunks are large, so that few kernels launch
CPU_CHUNK_BYTES = 6 << 20
ACCELERATOR_CHUNK_BYTES = 256 << 20


def chunk_positions(device: torch.device, vocab: int) -> int:
    """Positions per chunk of :func:`next_token_losses` on ``device`` for a vocabulary of ``vocab``."""
    budget = CPU_CHUNK_BYTES if device.type == "cpu" else ACCELERATOR_CHUNK_BYTES
    return max(1, budget // (4 * vocab))


class _NextTokenLosses(torch.autograd.Function):
    """Per-position cross-entropy and KL(teacher || student), computed chunk by chunk of positions.

    The unfused form (``F.cross_entropy`` and a log-softmax KL on ``logits.float()``) writes and
    reads several ``(B, T, V)`` fp32 tensors; on a CPU those passes were about 28% of a distilled
    training step. Here each chunk of labelled positions is cast, normalised and reduced while in
    cache, and the backward recomputes the softmaxes instead of saving them: with ``g_ce``, ``g_kl``
    the gradients of the per-position outputs, a position's logit gradient is
    ``(g_ce + g_kl) * softmax(s) - g_ce * onehot(label) - g_kl * softmax(t)``, in fp32, written once in
    the logits' dtype. Unlabelled positions cost nothing and get no gradient.
    """

    @staticmethod
    def forward(ctx, logits, labels, teacher):  # (B, T, V), (B, T), (B, T, V) or None
        batch, length, vocab = logits.shape
        targets = labels[:, 1:].flatten()  # position b * (T - 1) + t predicts labels[b, t + 1]
        scored = (targets != IGNORE_INDEX).nonzero()[:, 0]  # (N,) positions in (B, T - 1)
        rows = scored + scored // max(length - 1, 1)  # (N,) the same positions' rows in (B * T, V)
        target = targets[scored]
        flat = logits.reshape(batch * length, vocab)
        flat_t = teacher.reshape(batch * length, vocab) if teacher is not None else None
        ce = torch.zeros(batch * (length - 1), dtype=torch.float32, device=logits.device)
        kl = torch.zeros_like(ce)
        chunks = _chunks(rows, chunk_positions(logits.device, vocab))
        for i, j, part in chunks:
            log_s = flat[part].float().log_softmax(-1)  # (C, V)
            ce[scored[i:j]] = -log_s.gather(1, target[i:j, None])[:, 0]
            if flat_t is not None:
                log_t = flat_t[part].float().log_softmax(-1)
                gap = log_t - log_s
                kl[scored[i:j]] = log_t.exp_().mul_(gap).sum(-1)
        ctx.save_for_backward(logits, teacher if teacher is not None else logits.new_empty(0), scored, target)
        ctx.chunks, ctx.has_teacher = chunks, teacher is not None
        return ce.view(batch, length - 1), kl.view(batch, length - 1)

    @staticmethod
    def backward(ctx, g_ce, g_kl):
        logits, teacher, scored, target = ctx.saved_tensors
        batch, length, vocab = logits.shape
        flat = logits.reshape(batch * length, vocab)
        flat_t = teacher.reshape(batch * length, vocab) if ctx.has_teacher else None
        grad = torch.zeros_like(flat)
        g_ce = g_ce.flatten()[scored].float() if g_ce is not None else torch.zeros(len(scored), device=logits.device)
        g_kl = (g_kl.flatten()[scored].float() if g_kl is not None and ctx.has_teacher
                else torch.zeros(len(scored), device=logits.device))
        for i, j, part in ctx.chunks:
            w_ce, w_kl = g_ce[i:j, None], g_kl[i:j, None]
            g = flat[part].float().softmax(-1).mul_(w_ce + w_kl)  # (C, V)
            g.scatter_add_(1, target[i:j, None], -w_ce)
            if flat_t is not None:
                g.sub_(flat_t[part].float().softmax(-1).mul_(w_kl))
            grad[part] = g.to(grad.dtype)
        return grad.view(batch, length, vocab), None, None


def _chunks(rows: torch.Tensor, size: int) -> list[tuple[int, int, slice | torch.Tensor]]:
    """``(i, j, rows[i:j])`` for each chunk of ``size`` rows, as a slice where the rows are consecutive
    (a QA record's answer, running text): slicing copies far faster than gathering rows on a CPU."""
    out: list[tuple[int, int, slice | torch.Tensor]] = []
    listed = rows.tolist()
    for i in range(0, len(listed), size):
        part, j = listed[i:i + size], min(i + size, len(listed))
        consecutive = part[-1] - part[0] == len(part) - 1
        out.append((i, j, slice(part[0], part[-1] + 1) if consecutive else rows[i:j]))
    return out


def next_token_losses(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                      reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy and KL(teacher || student) over the positions whose label is not -100,
    in one pass over the vocabulary (``mean`` or ``sum``; the mean of no position is nan).

    Args:
        logits: ``(B, T, V)``, any float dtype; the work runs in fp32, the gradient comes back in it.
        labels: ``(B, T)``; the logits at ``t`` predict ``labels[:, t + 1]``.
        teacher_logits: ``(B, T, V)`` of a teacher (no gradient), or None: the KL is then 0.

    Returns:
        ``(cross_entropy, kl)``, fp32 scalars.

    Example:
        >>> lm, kl = next_token_losses(student.logits, batch["labels"], teacher.logits, "sum")  # doctest: +SKIP
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if teacher_logits is not None and teacher_logits.shape != logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match the student's {tuple(logits.shape)}")
    teacher = teacher_logits.detach() if teacher_logits is not None else None
    ce, kl = _NextTokenLosses.apply(logits, labels, teacher)  # (B, T - 1) each, 0 where unlabelled
    if reduction == "sum":
        return ce.sum(), kl.sum()
    count = (labels[:, 1:] != IGNORE_INDEX).sum()
    return ce.sum() / count, kl.sum() / count


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over labels != -100 (``mean`` or ``sum``). logits: (B, T, V); labels: (B, T)."""
    return next_token_losses(logits, labels, reduction=reduction)[0]


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
               reduction: str = "mean") -> torch.Tensor:
    """KL(teacher || student) over the positions the LM loss counts (``mean`` or ``sum``). logits: (B, T, V)."""
    return next_token_losses(student_logits, labels, teacher_logits, reduction)[1]


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


def unlikelihood(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Token-level unlikelihood against repeating oneself (Welleck et al., 2019), per labelled position.

    At each position whose next token is scored, every distinct token that an earlier scored position
    of the same row had as its target, other than this position's own target, is pushed down by
    ``-log(1 - p(token))``. On text every position is scored, so the candidates are the text so far;
    on QA records only the answer is, so copying the answer from the context is not penalised, only
    repeating the answer's own tokens. logits: (B, T, V); labels: (B, T).
    """
    targets = labels[:, 1:]  # (B, N): position i predicts targets[:, i]
    scored = targets != IGNORE_INDEX
    n = targets.shape[1]
    token = targets.clamp_min(0)
    same = token[:, :, None] == token[:, None, :]  # (B, N, N): [i, s] the same token
    earlier = torch.ones(n, n, dtype=torch.bool, device=targets.device).tril(-1)  # s < i
    # the first scored occurrence of each token, so a token repeated in the context counts once
    first = scored & ~(same & earlier & scored[:, None, :]).any(-1)  # (B, N)
    candidate = earlier & (first & scored)[:, None, :] & ~same & scored[:, :, None]  # (B, i, s)
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, token[:, None, :].expand(-1, n, -1))  # (B, i, s)
    per_pair = pushed_down(logp)
    per_token = (per_pair * candidate).sum(-1)[scored]
    return per_token.sum() if reduction == "sum" else per_token.mean()


def pushed_down(logp: torch.Tensor) -> torch.Tensor:
    """The unlikelihood penalty ``-log(1 - p)`` of tokens with log-probabilities ``logp`` (p capped below 1)."""
    return -torch.log1p(-logp.exp().clamp(max=1 - 1e-5))


@contextlib.contextmanager
def plans_in_eval(model, plain):
    """Eval mode, with :func:`set_plan` free to run any plan without a :class:`PlanMismatchWarning`; the
    plan and training mode come back on exit. ``model`` may be wrapped (DDP/FSDP), ``plain`` is it unwrapped."""
    train_plan = get_router(plain).plan
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PlanMismatchWarning)
        try:
            yield
        finally:
            set_plan(plain, train_plan)
            model.train()


def labelled_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The tokens a batch's losses count: next-token positions whose label is not -100."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _forward(model, batch: dict[str, torch.Tensor], hidden: bool = False, route: tuple[int, ...] | None = None) -> Any:
    """The model's output on ``batch`` (with every layer's hidden states when ``hidden``), under ``route``
    if given (passed by value as the forward's :data:`~kvroute.hf.patch.ROUTE_ARG`), else as routed now."""
    extra = {ROUTE_ARG: route} if route is not None else {}
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False,
                 output_hidden_states=hidden, **extra)


@torch.no_grad()
def mean_loss(model, batches: torch.Tensor | Iterable[dict[str, torch.Tensor]], batch_size: int = 4,
              autocast: Callable = contextlib.nullcontext) -> float:
    """Mean next-token loss of ``model`` as it is routed now, over every labelled token of ``batches``.

    The one "loss under a plan" of kvroute: plan search, calibration reports and training's
    validation (:func:`evaluate_plans`) all use it. It leaves the model's mode and plan alone.

    Args:
        model: a routed model (possibly wrapped by DDP/FSDP), called without a cache.
        batches: ``(N, T)`` token ids, cut into ``batch_size`` rows with every token labelled; or
            batches with ``input_ids``, ``labels`` (``-100``: not counted) and optionally ``attention_mask``.
        batch_size: rows per forward pass when ``batches`` is a tensor.
        autocast: a context manager each forward runs in (e.g. :func:`kvroute.precision.autocast`).

    Returns:
        Summed token loss / labelled tokens (0.0 when nothing is labelled).

    Example:
        >>> loss = mean_loss(model, chunks)  # doctest: +SKIP
    """
    if isinstance(batches, torch.Tensor):
        batches = ({"input_ids": rows, "labels": rows} for rows in batches.split(batch_size))
    device = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64)  # summed token loss, tokens
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            logits = _forward(model, batch).logits
        total += torch.tensor([float(causal_lm_loss(logits, batch["labels"], "sum")), labelled_tokens(batch)],
                              dtype=torch.float64)
    return float(total[0] / total[1].clamp(min=1))


def evaluate_plans(model, plain, val_batches: list[dict[str, torch.Tensor]], plans: list[str],
                   autocast: Callable = contextlib.nullcontext) -> dict[str, float]:
    """:func:`mean_loss` per plan (eval mode), then back to training mode and the saved plan.

    Args:
        model: the model to call (possibly wrapped by DDP/FSDP).
        plain: the same model unwrapped (a routed transformers model).
        val_batches: batches with ``input_ids``, ``labels`` (and ``attention_mask``).
        plans: plan specs, e.g. ``["full", "every:2"]``.

    Every process evaluates all ``val_batches`` (a few), so wrapped models see the
    same forward calls on every rank. A model trained for one plan (``plan:SPEC``) is
    measured under the others without a warning: they were asked for.
    """
    out: dict[str, float] = {}
    with plans_in_eval(model, plain):
        for spec in plans:
            set_plan(plain, spec)
            out[spec] = mean_loss(model, val_batches, autocast=autocast)
    return out
