"""``kvroute plan search`` as a library call: load a checkpoint, cut calibration text, search, report.

:mod:`kvroute.search` holds the search itself (on a model and token chunks); this module
runs it on a checkpoint from a :class:`SearchConfig` and keeps what it ran on.

Example:
    >>> config = SearchConfig("runs/rcla/final", budget="0.25", data=["heldout/"])  # doctest: +SKIP
    >>> run = search_checkpoint(config)                                               # doctest: +SKIP
    >>> print(run.report())                                                           # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvroute.plan import KVShape
from kvroute.data.text import read_texts
from kvroute.search import SearchResult, calibration_chunks, search_plan


@dataclass
class SearchConfig:
    """What ``kvroute plan search`` searches, on what, and how.

    Args:
        model: checkpoint folder, hub id or .gguf (weights and tokenizer are loaded).
        budget: fraction of layers (0.25), number of owner layers (8) or memory (6GiB, with --context);
            see :func:`kvroute.budget.owners_for_budget`.
        data: calibration text files or folders (.txt, .md, .jsonl).
        chunk_tokens: tokens per calibration chunk.
        max_chunks: chunks read in total, evenly spaced over the text.
        heldout: fraction of the chunks (the last ones) held out for the comparison.
        beam: owner sets kept per greedy step.
        shortlist: lazy greedy: after the first step, try only the N layers that did best in the
            previous step (default: try all).
        refine: rounds of moving single owners to neighbouring layers (0: none).
        batch_size: chunks per forward pass.
        model_dtype: dtype the model runs in.
        batch: sequences a memory budget is sized for.
        context: tokens per sequence a memory budget is sized for.
        kv_dtype: KV cache dtype of the memory accounting.
    """

    model: str
    budget: str | float | int
    data: list[str]
    chunk_tokens: int = 256
    max_chunks: int | None = 8
    heldout: float = 0.5
    beam: int = 1
    shortlist: int | None = None
    refine: int = 20
    batch_size: int = 8
    model_dtype: str = "float32"
    batch: int = 1
    context: int | None = None
    kv_dtype: str = "bf16"

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, os.PathLike)):
            self.data = [self.data]
        if not self.data:
            raise ValueError("--data: give at least one calibration text file or folder")
        if not 0.0 <= self.heldout < 1.0:
            raise ValueError(f"--heldout must be in [0, 1), got {self.heldout}")
        for name in ("chunk_tokens", "beam", "batch_size", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("max_chunks", "shortlist", "context"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.refine < 0:
            raise ValueError(f"--refine must be >= 0, got {self.refine}")


@dataclass
class CheckpointSearch:
    """A plan search run on a checkpoint (``kvroute plan search``): the result and what it ran on.

    Attributes:
        result: the searched plan and its comparison table.
        checkpoint: the checkpoint searched.
        budget: the budget as given (fraction, owner count or memory size).
        data: the calibration text files or folders.
        chunk_tokens: tokens per chunk.
        chunks: chunks read in total (search and held out).
        heldout_chunks: chunks held out for the comparison.
    """

    result: SearchResult
    checkpoint: str
    budget: str | float | int
    data: list[str]
    chunk_tokens: int
    chunks: int
    heldout_chunks: int = 0

    def report(self) -> str:
        """The comparison table, the count of plans evaluated and the plan found."""
        return f"{self.result.table()}\n\n{self.result.evaluations} plans evaluated\nplan: {self.result.plan.spec}"

    def to_dict(self) -> dict[str, Any]:
        """What ``kvroute plan search --out`` writes: the plan, its loss, the table and the setup."""
        r = self.result
        return {"plan": r.plan.to_dict(), "loss": r.loss, "rows": r.rows, "evaluations": r.evaluations,
                "budget": self.budget, "data": self.data, "chunk_tokens": self.chunk_tokens, "chunks": self.chunks,
                "model": self.checkpoint}

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as JSON to ``path``."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


def split_heldout(chunks: torch.Tensor, heldout: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``chunks`` split into search chunks and the last ``heldout`` fraction (None when that is no chunk).

    At least one chunk is always searched on.
    """
    if not 0.0 <= heldout < 1.0:
        raise ValueError(f"--heldout must be in [0, 1), got {heldout}")
    n_search = max(1, round(len(chunks) * (1 - heldout)))
    return chunks[:n_search], chunks[n_search:] if n_search < len(chunks) else None


def search_checkpoint(
    config: SearchConfig, *, progress: bool = True, log: Callable[[str], Any] | None = None
) -> CheckpointSearch:
    """Load ``config.model``, read its calibration text and search the best plan for ``config.budget``.

    Args:
        config: the checkpoint, budget, data and search settings.
        progress: show tqdm progress bars.
        log: called with one line saying what is searched, before the search (e.g. ``print``).

    Returns:
        The search result with its setup; ``.report()`` prints it, ``.save(path)`` writes JSON.
    """
    from kvroute.budget import owners_for_budget
    from kvroute.models import load, load_tokenizer
    from kvroute.shapes import is_shape

    c = config
    if is_shape(c.model):
        raise ValueError(f"plan search needs a checkpoint with weights and a tokenizer, not the shape {c.model!r}")
    model = load(c.model, dtype=c.model_dtype)
    owners = owners_for_budget(c.budget, KVShape.from_config(model.config), c.batch, c.context, c.kv_dtype)
    chunks = calibration_chunks(load_tokenizer(c.model), read_texts(c.data), c.chunk_tokens, c.max_chunks)
    search, held = split_heldout(chunks, c.heldout)
    n_held = 0 if held is None else len(held)
    if log is not None:
        log(f"searching {owners}/{model.config.num_hidden_layers} owner layers on {len(search)} chunks of "
            f"{c.chunk_tokens} tokens ({n_held} held out)")
    result = search_plan(model, search, owners, held, beam=c.beam, shortlist=c.shortlist, refine=c.refine,
                         batch_size=c.batch_size, progress=progress)
    return CheckpointSearch(result, str(c.model), c.budget, [str(d) for d in c.data], c.chunk_tokens, len(chunks),
                            n_held)
