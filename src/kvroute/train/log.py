"""What a training run logs: one :class:`StepInfo` per optimizer step, and the metrics files.

- ``metrics.jsonl``: one JSON object per logged step (``{"step", "loss", ...}``)
  or eval (``{"step", "eval": {plan: loss}}``);
- ``train.csv`` / ``eval.csv``: the same as tables;
- ``tb/``: TensorBoard events (when ``tensorboard`` is installed).

Checkpoints and resumable state: :mod:`kvroute.train.checkpoint`.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TRAIN_COLUMNS = ("step", "loss", "lm_loss", "distill", "distill_hidden", "unlikelihood", "seq_unlikelihood",
                 "repeated", "seq_distill", "lr", "grad_norm", "tokens", "tok_per_s")
EVAL_COLUMNS = ("step", "plan", "loss", "ppl")


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
    unlikelihood: float = 0.0
    #: sequence-level unlikelihood per continuation token, and the share of continuation tokens
    #: that repeat an n-gram (``--seq-unlikelihood``; 0 when off)
    seq_unlikelihood: float = 0.0
    repeated: float = 0.0
    #: on-policy distillation on the same rollouts, per continuation token (``--seq-distill``; 0 when off)
    seq_distill: float = 0.0


class MetricsLog:
    """Writes step and eval records to JSONL, CSV and TensorBoard.

    Args:
        out_dir: the run folder.
        tensorboard: also write TensorBoard events under ``out_dir/tb``.
        enabled: False on non-main processes (writes nothing).
        truncate_after: records after this step are dropped (a resumed run redoes them);
            0 starts the files afresh.
    """

    def __init__(self, out_dir: Path, tensorboard: bool = True, enabled: bool = True, truncate_after: int = 0):
        self.enabled = enabled
        self.jsonl = out_dir / "metrics.jsonl"
        self.train_csv = out_dir / "train.csv"
        self.eval_csv = out_dir / "eval.csv"
        self.writer = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.jsonl) if truncate_after and r["step"] <= truncate_after]
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in kept))
        _write_csv(self.train_csv, TRAIN_COLUMNS, [r for r in kept if "loss" in r])
        _write_csv(self.eval_csv, EVAL_COLUMNS, [row for r in kept if "eval" in r for row in _eval_rows(r)])
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed
                SummaryWriter = None
            if SummaryWriter is not None:
                purge = truncate_after + 1 if truncate_after else None  # drop events a resumed run redoes
                self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=purge)

    def step(self, info: StepInfo) -> None:
        if not self.enabled:
            return
        record = {k: v for k, v in asdict(info).items() if k != "routes"}
        record["route"] = list(info.routes[-1]) if info.routes else None
        self._append(record)
        _append_csv(self.train_csv, TRAIN_COLUMNS, record)
        if self.writer is not None:
            for key in ("loss", "lm_loss", "distill", "distill_hidden", "unlikelihood", "seq_unlikelihood", "repeated",
                        "seq_distill", "lr", "tok_per_s", "grad_norm"):
                if record.get(key) is not None:
                    self.writer.add_scalar(f"train/{key}", record[key], info.step)

    def eval(self, step: int, losses: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "eval": losses}
        self._append(record)
        for row in _eval_rows(record):
            _append_csv(self.eval_csv, EVAL_COLUMNS, row)
        if self.writer is not None:
            for plan, loss in losses.items():
                self.writer.add_scalar(f"eval/loss/{plan}", loss, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def _append(self, record: dict[str, Any]) -> None:
        with self.jsonl.open("a") as fh:
            fh.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (empty when it does not exist)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _eval_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"step": record["step"], "plan": plan, "loss": loss, "ppl": math.exp(min(loss, 50))}
            for plan, loss in record["eval"].items()]


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _append_csv(path: Path, columns: tuple[str, ...], row: dict[str, Any]) -> None:
    with path.open("a", newline="") as fh:
        csv.DictWriter(fh, columns, extrasaction="ignore").writerow(row)
