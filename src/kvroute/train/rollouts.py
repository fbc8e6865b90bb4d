"""Sequence-level unlikelihood on the model's own greedy continuations (Welleck et al., 2019).

Token-level unlikelihood (:func:`kvroute.train.losses.unlikelihood`) trains on reference text,
where the model seldom repeats itself, and leaves greedy loops under a shared plan where they
are. The sequence-level form trains on what the model writes: it continues a prefix greedily
under the plan (:func:`greedy_rollout`, through the plan's shared cache), marks every token
that completes or continues an n-gram already in the row (:func:`repeated_ngram_mask`), and
pushes those tokens down by ``-log(1 - p)`` (:func:`sequence_unlikelihood`). On-policy
distillation (``--seq-distill``) trains on the same rollouts: the student under the plan is pulled
to a full-cache teacher's next-token distribution over the text the student wrote, up to where it
starts repeating itself.

``kvroute train --seq-unlikelihood W`` runs this on every micro-batch under the plan the
micro-batch draws (``--routing plan:A+B``); see :mod:`kvroute.train.loop`.

Example:
    >>> ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5]])
    >>> repeated_ngram_mask(ids, start=0, n=2).int().tolist()
    [[0, 0, 0, 1, 1, 1, 1]]
"""

from __future__ import annotations

import torch

from kvroute.data.qa import IGNORE_INDEX
from kvroute.hf.compat import cache_kwargs, output_cache
from kvroute.hf.patch import ROUTE_ARG
from kvroute.train.losses import distill_kl, pushed_down


def repeated_ngram_mask(ids: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """``(B, T)`` bool: the tokens at positions ``>= start`` that belong to an n-gram seen earlier in the row.

    An n-gram counts as seen once it ended anywhere before, prefix included, so a continuation
    that copies the prefix is marked too. ids: ``(B, T)``.
    """
    if n < 1:
        raise ValueError(f"n-gram length must be >= 1, got {n}")
    batch, length = ids.shape
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b, row in enumerate(ids.tolist()):
        seen: set[tuple[int, ...]] = set()
        for i in range(length - n + 1):
            gram = tuple(row[i:i + n])
            if gram in seen and i + n > start:
                mask[b, max(i, start):i + n] = True
            seen.add(gram)
    return mask.to(ids.device)


def sequence_unlikelihood(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                          reduction: str = "sum") -> torch.Tensor:
    """``-log(1 - p(token))`` summed (``sum``) or averaged (``mean``) over the tokens ``mask`` marks.

    logits: ``(B, T, V)`` of a forward over ``ids``; ids, mask: ``(B, T)``. Position 0 is never
    scored (nothing predicts it).
    """
    target = mask[:, 1:]
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
    total = (pushed_down(logp) * target).sum()
    return total / target.sum().clamp(min=1) if reduction == "mean" else total


@torch.no_grad()
def greedy_rollout(model: torch.nn.Module, prefix: torch.Tensor, length: int) -> torch.Tensor:
    """``prefix`` followed by ``length`` greedy tokens, decoded through the cache of the model's plan.

    Exactly ``length`` forward calls (no stopping at EOS), so every process of a sharded run
    makes the same calls. Call it in eval mode: the pass then runs the model's plan
    (:func:`kvroute.set_plan`). prefix: ``(B, P)`` token ids, no padding; returns ``(B, P + length)``.
    """
    if length < 1:
        raise ValueError(f"rollout length must be >= 1, got {length}")
    out = model(input_ids=prefix, use_cache=True)
    cache, ids = output_cache(out), prefix
    for step in range(length):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
        if step < length - 1:
            out = model(input_ids=token, use_cache=True, **cache_kwargs(cache))
    return ids


def rollout_loss(model: torch.nn.Module, ids: torch.Tensor, start: int, n: int, route: tuple[int, ...],
                 teacher_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, int, torch.Tensor]:
    """The summed losses of rollouts ``ids`` under ``route``: sequence-level unlikelihood, how many
    tokens it marks, and with ``teacher_logits`` (a full-cache forward over ``ids``) the summed
    KL(teacher || student) at each continuation token up to and including a row's first marked
    one (on-policy distillation; else 0). Past that token the teacher reads the student's loop
    and, copying it, would teach the loop (distilling at every token made loops worse; docs/RESULTS.md).

    ``model`` runs in training mode with gradients; ``route`` is passed by value as the forward's
    :data:`~kvroute.hf.patch.ROUTE_ARG`, so the pass reads the KV the plan's cache would.
    """
    mask = repeated_ngram_mask(ids, start, n)
    logits = model(input_ids=ids, use_cache=False, **{ROUTE_ARG: route}).logits
    kl = torch.zeros((), device=logits.device)
    if teacher_logits is not None:
        clean = mask.cumsum(1) - mask.long() == 0  # no marked token before: up to the first marked one
        continuation = ids.masked_fill(~clean, IGNORE_INDEX)
        continuation[:, :start] = IGNORE_INDEX  # the positions that predict a clean continuation token
        kl = distill_kl(logits, teacher_logits, continuation, reduction="sum")
    return sequence_unlikelihood(logits, ids, mask, "sum"), int(mask[:, 1:].sum()), kl
