"""What the training tests share beyond the text kit (textkit.py)."""

from __future__ import annotations

import torch


def accumulated_grads(cfg) -> dict[str, torch.Tensor]:
    """The gradient one optimizer step of the run ``cfg`` would apply (its optimizer does nothing)."""
    from kvroute.train import _Run

    run = _Run(cfg)
    run.optimizer.step = lambda *a, **k: None
    run.optimizer.zero_grad = lambda *a, **k: None
    run.model.train()
    run.train_step()
    return {n: p.grad.clone() for n, p in run.plain.named_parameters() if p.grad is not None}
