"""Data assembly: ``--data`` as packed text blocks, QA examples or a mixture, and the
deterministic batch order a run resumes by its counter."""

from __future__ import annotations

from typing import Any

import torch

from kvroute.data.mix import Mixture
from kvroute.data.qa import QACollator, load_qa_splits
from kvroute.data.text import collate_blocks, load_text_splits
from kvroute.train.config import TrainConfig, _split_sources


def _load_data(config: TrainConfig, tokenizer: Any):
    """(train, val, collate): packed text, QA examples, or a :class:`Mixture` of both."""
    qa_sources, text_sources = _split_sources(config)
    parts: list[tuple[Any, Any]] = []
    if text_sources:
        parts.append(load_text_splits(text_sources, tokenizer, config.seq_len, config.val_fraction, config.cache_dir))
    if qa_sources:
        train_ds, val_ds = load_qa_splits(qa_sources, tokenizer, config.seq_len, config.val_fraction, config.seed)
        for ds in (train_ds, val_ds):
            ds.question_first_p = config.question_first_p
        parts.append((train_ds, val_ds))
    if len(parts) == 1:
        train_ds, val_ds = parts[0]
        return train_ds, val_ds, collate_blocks if text_sources else QACollator(tokenizer.pad_token_id)
    return (Mixture([p[0] for p in parts]), Mixture([p[1] for p in parts]), QACollator(tokenizer.pad_token_id))


class _Batches:
    """Deterministic batches: a seeded permutation per epoch, sharded over processes.

    Micro-batch ``k`` is a pure function of (seed, k), so a run resumes by its counter.
    """

    def __init__(self, dataset, collate, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.dataset, self.collate, self.batch_size = dataset, collate, batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.per_epoch = len(dataset) // (batch_size * world)
        if self.per_epoch == 0:
            raise ValueError(
                f"--data gives {len(dataset)} training examples, fewer than one batch of "
                f"--batch-size {batch_size} x {world} process(es); add data or lower --batch-size/--seq-len"
            )
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def __call__(self, micro: int) -> dict[str, torch.Tensor]:
        epoch, index = divmod(micro, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(len(self.dataset), generator=gen)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
        start = (index * self.world + self.rank) * self.batch_size
        return self.collate([self.dataset[int(i)] for i in self._perm[start:start + self.batch_size]])
