"""What a training run leaves behind besides weights: metrics files and resumable state.

- ``metrics.jsonl``: one JSON object per logged step (``{"step", "loss", ...}``)
  or eval (``{"step", "eval": {plan: loss}}``);
- ``train.csv`` / ``eval.csv``: the same as tables;
- ``tb/``: TensorBoard events (when ``tensorboard`` is installed);
- ``checkpoints/step-NNNNNN/training_state/state.pt``: optimizer, scheduler, RNGs,
  router generator and data position. The folder is renamed into place last, so a
  checkpoint without it is incomplete and never resumed from.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

STATE_DIR = "training_state"
TRAIN_COLUMNS = ("step", "loss", "lm_loss", "distill", "distill_hidden", "lr", "grad_norm", "tokens", "tok_per_s")
EVAL_COLUMNS = ("step", "plan", "loss", "ppl")


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

    def step(self, info: Any) -> None:
        if not self.enabled:
            return
        record = {k: v for k, v in asdict(info).items() if k != "routes"}
        record["route"] = list(info.routes[-1]) if info.routes else None
        self._append(record)
        _append_csv(self.train_csv, TRAIN_COLUMNS, record)
        if self.writer is not None:
            for key in ("loss", "lm_loss", "distill", "distill_hidden", "lr", "tok_per_s", "grad_norm"):
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


def staging_dir(folder: Path) -> Path:
    """Where a checkpoint's training state is written before :func:`commit_training_state` renames it."""
    return folder / f".{STATE_DIR}.tmp"


def stage_training_state(folder: Path) -> Path:
    """Create an empty :func:`staging_dir` (other processes may then write shards into it)."""
    tmp = staging_dir(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_training_state(folder: Path, state: dict[str, Any], keep: int = 0) -> None:
    """Write ``state.pt`` into the staged folder, rename it to ``folder/training_state``, and
    drop all but the newest ``keep`` checkpoints."""
    tmp = staging_dir(folder)
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(folder / STATE_DIR, ignore_errors=True)
    tmp.rename(folder / STATE_DIR)
    if keep:
        for old in _complete_checkpoints(folder.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def save_training_state(folder: Path, state: dict[str, Any], keep: int = 0) -> None:
    """Write ``folder/training_state`` atomically, then drop all but the newest ``keep`` checkpoints."""
    stage_training_state(folder)
    commit_training_state(folder, state, keep)


def load_training_state(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / STATE_DIR / "state.pt"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {folder} is not a complete training checkpoint (no {STATE_DIR}/)")
    return torch.load(path, map_location="cpu", weights_only=False)


def _complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / STATE_DIR / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def remove_partial_checkpoints(root: str | Path) -> list[Path]:
    """Delete what a killed save left under ``root`` (``run/checkpoints``): a half-written
    checkpoint folder (``.step-N.tmp-*``), a replaced one (``.step-N.old``) and half-written
    training states (``step-N/.training_state.tmp``). Complete checkpoints are never touched.
    Returns what was removed."""
    root = Path(root)
    if not root.is_dir():
        return []
    stale = [p for p in root.glob(".step-*") if p.is_dir() and (".tmp-" in p.name or p.name.endswith(".old"))]
    stale += [p for p in root.glob(f"step-*/.{STATE_DIR}.tmp") if p.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (``run/checkpoints``), or None."""
    found = _complete_checkpoints(Path(root))
    return found[-1] if found else None
