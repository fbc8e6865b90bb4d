"""Mixed fine-tuning data: packed text blocks and context-QA examples in one dataset.

The paper fine-tunes on a context-QA mixture; kvroute lets a run add plain text
to it (``--data corpus/ qa.jsonl``). Each part keeps its own loss: every token of
a text block, the answer tokens of a QA example. Items are drawn from the
concatenation, so each part's share of the batches is its share of the items.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Mixture(torch.utils.data.Dataset):
    """The concatenation of datasets whose items are ``{input_ids, labels}`` of any length.

    Batch it with :class:`kvroute.data.qa.QACollator`, which pads. :meth:`set_epoch`
    reaches every part that has one (the QA order coins).

    Example:
        >>> mix = Mixture([text_train, qa_train])  # doctest: +SKIP
        >>> len(mix) == len(text_train) + len(qa_train)  # doctest: +SKIP
        True
    """

    parts: list[Any]
    _ends: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.parts = [part for part in self.parts if len(part)]
        if not self.parts:
            raise ValueError("a data mixture needs at least one non-empty part")
        ends, total = [], 0
        for part in self.parts:
            total += len(part)
            ends.append(total)
        self._ends = ends

    def __len__(self) -> int:
        return self._ends[-1]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a mixture of {len(self)} items")
        k = bisect.bisect_right(self._ends, index)
        return self.parts[k][index - (self._ends[k - 1] if k else 0)]

    def set_epoch(self, epoch: int) -> None:
        for part in self.parts:
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)

    @property
    def sizes(self) -> list[int]:
        """Items per part."""
        return [len(part) for part in self.parts]
