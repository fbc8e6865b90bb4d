"""Checkpoints and resumable state: weights, then the training state, each written atomically.

``checkpoints/step-NNNNNN/training_state/state.pt`` holds the optimizer, scheduler, RNGs,
router generator and data position. The folder is renamed into place last, so a checkpoint
without it is incomplete and never resumed from.
"""

from __future__ import annotations

import copy
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvroute import sharding
from kvroute.train.config import RESUME_FIXED, _flag

STATE_DIR = "training_state"


def save_run(run: Any, folder: Path, training_state: bool) -> None:
    """Weights + tokenizer (atomic), then the training state (renamed into place last).

    Under ``--fsdp`` every process gathers the weights for the main one to write, and each
    writes its own shards of weights and optimizer state into the training state.
    """
    from kvroute.models import save_checkpoint

    acc, c = run.accelerator, run.config
    acc.wait_for_everyone()
    gathered = sharding.full_state_dict(run.model) if run.fsdp else None
    if run.main:
        save_checkpoint(copy.deepcopy(run.plain).merge_and_unload() if c.lora_r else run.plain,
                        folder, run.tokenizer, state_dict=gathered)
    del gathered
    if training_state:
        if run.main:
            stage_training_state(folder)
        acc.wait_for_everyone()
        if run.fsdp:
            sharding.save_sharded(run.model, run.optimizer, staging_dir(folder))
            acc.wait_for_everyone()
        if run.main:
            lora = {k: v for k, v in run.plain.state_dict().items() if "lora_" in k} if c.lora_r else None
            commit_training_state(folder, {
                "step": run.step, "micro": run.micro,
                "optimizer": None if run.fsdp else run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(), "router": run.router.state_dict(),
                "rng": _get_rng(), "trainable": lora, "config": asdict(c),
                "processes": acc.num_processes,
            }, keep=c.keep_checkpoints)
    acc.wait_for_everyone()


def restore_run(run: Any, folder: Path) -> None:
    """Continue ``run`` from ``folder``: its step counters, optimizer, scheduler, router and RNGs."""
    state = load_training_state(folder)
    saved = state.get("config", {})
    for name in RESUME_FIXED:
        old, new = saved.get(name), asdict(run.config)[name]
        if name in saved and (list(old) if isinstance(old, tuple) else old) != new:
            raise ValueError(
                f"--resume: {folder} was trained with {_flag(name)} {old!r}, this run asks for {new!r}; "
                "resume with the same settings"
            )
    processes = state.get("processes", 1)
    if processes != run.accelerator.num_processes:
        raise ValueError(
            f"--resume: {folder} was written by {processes} process(es), this run has "
            f"{run.accelerator.num_processes}; the data order and the global batch depend on it, so "
            f"resume on {processes} process(es)"
        )
    run.step, run.micro = state["step"], state["micro"]
    if run.fsdp:
        sharding.load_sharded(run.model, run.optimizer, folder / STATE_DIR)
    else:
        fused = [group.get("fused") for group in run.optimizer.param_groups]
        run.optimizer.load_state_dict(state["optimizer"])
        for group, kind in zip(run.optimizer.param_groups, fused):  # this run's update kernel, not the saved one's
            group["fused"] = kind
    run.scheduler.load_state_dict(state["scheduler"])
    run.scheduler.lr_lambdas = [run.schedule()] * len(run.scheduler.lr_lambdas)  # this run's --max-steps
    run.router.load_state_dict(state["router"])
    if state.get("trainable"):
        run.plain.load_state_dict(state["trainable"], strict=False)
    _set_rng(state["rng"])


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
