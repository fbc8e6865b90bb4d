"""``kvroute plan search`` as a library call: load a checkpoint, cut calibration text (or read QA
records), search, report.

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

from kvroute.data.qa import answer_batches, read_qa
from kvroute.data.text import read_texts
from kvroute.plan import KVShape
from kvroute.precision import Precision, autocast, resolve_precision
from kvroute.search import SearchResult, calibration_chunks, evenly_spaced, search_plan


@dataclass
class SearchConfig:
    """What ``kvroute plan search`` searches, on what, and how.

    Args:
        model: checkpoint folder, hub id or .gguf (weights and tokenizer are loaded).
        budget: fraction of layers (0.25), number of owner layers (8) or memory (6GiB, with --context);
            see :func:`kvroute.budget.owners_for_budget`.
        data: calibration text files or folders (.txt, .md, .jsonl); the search minimizes the loss on them.
        qa: instead of --data, context-QA records (JSONL ``{context, question, answer}``, as ``eval --qa``):
            the search minimizes the loss on their first answers (and EOS), after the prompt ``eval --qa``
            gives them without ``--chat``, for a plan chosen for the task it will serve (long contexts, say).
        chunk_tokens: tokens per calibration chunk.
        max_chunks: chunks read in total, evenly spaced over the text.
        max_records: with --qa, records read in total, evenly spaced over them (default: all).
        heldout: fraction of the chunks or records (the last ones) held out for the comparison.
        beam: owner sets kept per greedy step.
        shortlist: lazy greedy: after the first step, try only the N layers that did best in the
            previous step (default: try all).
        refine: rounds of moving single owners to neighbouring layers (0: none).
        batch_size: chunks (or QA records: lower it for long contexts) per forward pass.
        model_dtype: dtype the model runs in.
        precision: ``fp32`` scores in the model's dtype, ``bf16`` under bfloat16 autocast (about twice
            as fast on a CPU with native bf16), ``auto`` picks bf16 where the hardware runs it natively.
        batch: sequences a memory budget is sized for.
        context: tokens per sequence a memory budget is sized for.
        kv_dtype: KV cache dtype of the memory accounting.
    """

    model: str
    budget: str | float | int
    data: list[str] | None = None
    qa: list[str] | None = None
    chunk_tokens: int = 256
    max_chunks: int | None = 8
    max_records: int | None = None
    heldout: float = 0.5
    beam: int = 1
    shortlist: int | None = None
    refine: int = 20
    batch_size: int = 8
    model_dtype: str = "float32"
    precision: Precision = "fp32"
    batch: int = 1
    context: int | None = None
    kv_dtype: str = "bf16"

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, os.PathLike)):
            self.data = [self.data]
        if isinstance(self.qa, (str, os.PathLike)):
            self.qa = [self.qa]
        if self.data and self.qa:
            raise ValueError("give --data (text: its loss) or --qa (QA records: the loss on their answers), not both")
        if not self.data and not self.qa:
            raise ValueError("--data: give at least one calibration text file or folder (or --qa: QA records)")
        resolve_precision(self.precision, "cpu")  # checks the name
        if not 0.0 <= self.heldout < 1.0:
            raise ValueError(f"--heldout must be in [0, 1), got {self.heldout}")
        for name in ("chunk_tokens", "beam", "batch_size", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("max_chunks", "max_records", "shortlist", "context"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.data and self.max_records is not None:
            raise ValueError("--max-records applies to --qa records; text is cut by --max-chunks")
        if self.refine < 0:
            raise ValueError(f"--refine must be >= 0, got {self.refine}")


@dataclass
class CheckpointSearch:
    """A plan search run on a checkpoint (``kvroute plan search``): the result and what it ran on.

    Attributes:
        result: the searched plan and its comparison table.
        checkpoint: the checkpoint searched.
        budget: the budget as given (fraction, owner count or memory size).
        data: the calibration text files or folders (the QA files with ``objective="qa"``).
        chunk_tokens: tokens per chunk (unused with ``objective="qa"``).
        chunks: chunks (or QA records) read in total (search and held out).
        heldout_chunks: chunks (or QA records) held out for the comparison.
        objective: ``text`` (the loss on every token of the chunks) or ``qa`` (the loss on the records' answers).
    """

    result: SearchResult
    checkpoint: str
    budget: str | float | int
    data: list[str]
    chunk_tokens: int
    chunks: int
    heldout_chunks: int = 0
    objective: str = "text"

    def describe(self) -> str:
        """What the search minimizes the loss on, and what it holds out."""
        return _describe(self.objective, self.chunks, self.heldout_chunks, self.chunk_tokens)

    def report(self) -> str:
        """The comparison table, the count of plans evaluated, what was scored and the plan found."""
        return (f"{self.result.table()}\n\n{self.result.evaluations} plans evaluated\n"
                f"loss on: {self.describe()}\nplan: {self.result.plan.spec}")

    def to_dict(self) -> dict[str, Any]:
        """What ``kvroute plan search --out`` writes: the plan, its loss, the table and the setup."""
        r = self.result
        return {"plan": r.plan.to_dict(), "loss": r.loss, "rows": r.rows, "evaluations": r.evaluations,
                "budget": self.budget, "data": self.data, "objective": self.objective,
                "chunk_tokens": self.chunk_tokens if self.objective == "text" else None, "chunks": self.chunks,
                "heldout_chunks": self.heldout_chunks, "model": self.checkpoint}

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as JSON to ``path``."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


def _describe(objective: str, total: int, heldout: int, chunk_tokens: int) -> str:
    what = (f"the answers of {total - heldout} QA records" if objective == "qa"
            else f"{total - heldout} chunks of {chunk_tokens} tokens")
    return f"{what} ({heldout} held out)"


def split_heldout(chunks: torch.Tensor | list, heldout: float) -> tuple[Any, Any]:
    """``chunks`` (a tensor or a list) split into search chunks and the last ``heldout`` fraction (None
    when that is no chunk).

    At least one chunk is always searched on.
    """
    if not 0.0 <= heldout < 1.0:
        raise ValueError(f"--heldout must be in [0, 1), got {heldout}")
    n_search = max(1, round(len(chunks) * (1 - heldout)))
    return chunks[:n_search], chunks[n_search:] if n_search < len(chunks) else None


def search_checkpoint(
    config: SearchConfig, *, progress: bool = True, log: Callable[[str], Any] | None = None
) -> CheckpointSearch:
    """Load ``config.model``, read its calibration text (or QA records), search the best plan for ``config.budget``.

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
    tokenizer = load_tokenizer(c.model)
    if c.qa:
        records = read_qa(c.qa, flag="--qa")
        records = [records[i] for i in evenly_spaced(len(records), c.max_records)]
        search, held = split_heldout(records, c.heldout)
        n_total, n_held = len(records), 0 if held is None else len(held)
        search = answer_batches(search, tokenizer, c.batch_size)
        held = None if held is None else answer_batches(held, tokenizer, c.batch_size)
    else:
        chunks = calibration_chunks(tokenizer, read_texts(c.data), c.chunk_tokens, c.max_chunks)
        search, held = split_heldout(chunks, c.heldout)
        n_total, n_held = len(chunks), 0 if held is None else len(held)
    objective = "qa" if c.qa else "text"
    if log is not None:
        log(f"searching {owners}/{model.config.num_hidden_layers} owner layers on "
            f"{_describe(objective, n_total, n_held, c.chunk_tokens)}")
    device = next(model.parameters()).device
    result = search_plan(model, search, owners, held, beam=c.beam, shortlist=c.shortlist, refine=c.refine,
                         batch_size=c.batch_size, progress=progress, autocast=lambda: autocast(c.precision, device))
    return CheckpointSearch(result, str(c.model), c.budget, [str(d) for d in (c.qa or c.data)], c.chunk_tokens,
                            n_total, n_held, objective)
