"""Context-QA data for training and evaluation: the record, the reader and the prompt.

Records are JSONL ``{context, question, answer}`` (``answer`` a string, a list of acceptable
strings or SQuAD's ``{"text": [...]}``; an optional ``id``) or ``hf:`` datasets with those
columns; :func:`read_qa` reads them for both training and evaluation.

For training, as in the paper, each example puts the question before the context with
probability 0.5 (a fresh, seeded coin per example and epoch), and the loss is on
the answer tokens only: the collator sets every other label to -100.

Prompt layout (the answer is followed by EOS)::

    Context: <context>            Question: <question>
    Question: <question>    or    Context: <context>
    Answer: <answer></s>          Answer: <answer></s>

Evaluation prompts the context-first layout without the answer (:func:`qa_prompt_ids`),
tokenized piece by piece as here, or, for instruction-tuned models, a chat message.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from kvroute.data.jsonl import iter_records
from kvroute.data.text import HF_PREFIX, load_hf_records, resolve_files

IGNORE_INDEX = -100
FIELDS = ("context", "question", "answer")
#: the prompt's pieces, each tokenized on its own
CONTEXT_HEAD, CONTEXT_TAIL, QUESTION, ANSWER_CUE = "Context: ", "\n", "Question: {question}\n", "Answer:"
#: the context-first prompt, piece by piece
QA_PROMPT_PARTS = (CONTEXT_HEAD, "{context}", CONTEXT_TAIL, QUESTION, ANSWER_CUE)
#: the prompt as a user message, for instruction-tuned models (evaluation with ``chat``)
QA_CHAT_PROMPT = "{context}\n\nAnswer the question with a short phrase from the text above.\nQuestion: {question}"


@dataclass(frozen=True)
class QARecord:
    """One context-QA example; ``answers`` are the acceptable answers, training uses the first.

    Example:
        >>> QARecord("Hunaes is the capital.", "What is the capital?", ("Hunaes",)).answer
        'Hunaes'
    """

    context: str
    question: str
    answers: tuple[str, ...]
    id: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.answers, tuple) or not self.answers or not all(isinstance(a, str) for a in self.answers):
            raise ValueError(f"QARecord answers must be a non-empty tuple of strings, got {self.answers!r}")

    @property
    def answer(self) -> str:
        """The answer trained on: the first acceptable one."""
        return self.answers[0]


def qa_prompt_ids(tokenizer: Any, example: QARecord, chat: bool = False) -> list[int]:
    """Prompt token ids, laid out and tokenized piece by piece as :class:`QADataset` does.

    ``[BOS] Context: <context>\\nQuestion: <question>\\nAnswer:``, or with ``chat`` a
    user message through the tokenizer's chat template (for instruction-tuned models).
    """
    if chat:
        content = QA_CHAT_PROMPT.format(context=example.context, question=example.question)
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    ids = list(tokenizer("", add_special_tokens=True)["input_ids"])  # BOS, if the model uses one
    for part in QA_PROMPT_PARTS:
        text = part.format(context=example.context, question=example.question)
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def _record(row: dict[str, Any], where: str, default_id: str) -> QARecord:
    answer = row["answer"]
    if isinstance(answer, dict) and "text" in answer:  # SQuAD-style {"text": [...]}
        answer = answer["text"]
    answers = (answer,) if isinstance(answer, str) else tuple(answer) if isinstance(answer, list) else ()
    if not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: 'answer' must be a string or a non-empty list of strings")
    if not isinstance(row["context"], str) or not isinstance(row["question"], str):
        raise ValueError(f"{where}: 'context' and 'question' must be strings")
    return QARecord(row["context"], row["question"], answers, str(row.get("id", default_id)))


def read_qa(sources: list[str | os.PathLike], limit: int | None = None, flag: str = "--data") -> list[QARecord]:
    """Read QA records from JSONL files (files, folders of ``*.jsonl``, globs) or ``hf:`` datasets.

    Args:
        sources: the files, folders, globs or ``hf:NAME[:CONFIG][@SPLIT]`` datasets.
        limit: keep only the first ``limit`` records (None or 0: all).
        flag: the option named in error messages.

    Raises:
        FileNotFoundError: for a source that matches no file.
        ValueError: naming the file and line of a bad record, or when there is no record.

    Example:
        >>> records = read_qa(["qa.jsonl"])  # doctest: +SKIP
    """
    records: list[QARecord] = []
    for path in resolve_files(sources, suffixes=(".jsonl",), flag=flag):
        records.extend(_record(row, f"{path}:{lineno}", str(lineno)) for lineno, row in iter_records(path, FIELDS, "QA"))
    for source in (str(s) for s in sources if str(s).startswith(HF_PREFIX)):
        for i, row in enumerate(load_hf_records(source, flag)):
            missing = [k for k in FIELDS if k not in row]
            if missing:
                raise ValueError(f"{source}: missing column(s) {', '.join(map(repr, missing))}; "
                                 f"a QA record needs {', '.join(FIELDS)}")
            records.append(_record(row, f"{source}:{i}", str(i)))
    if not records:
        raise ValueError(f"{flag}: empty dataset (no QA records in {', '.join(map(str, sources))})")
    return records[:limit] if limit else records


def split_records(
    records: list[QARecord], val_fraction: float, seed: int = 0
) -> tuple[list[QARecord], list[QARecord]]:
    """Shuffle (seeded) and hold out ``val_fraction`` of the records (at least one when asked)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = 0
    if val_fraction > 0 and len(records) >= 2:
        n_val = min(len(records) - 1, max(1, round(len(records) * val_fraction)))
    shuffled = [records[i] for i in order]
    return shuffled[n_val:], shuffled[:n_val]


@dataclass
class QADataset(torch.utils.data.Dataset):
    """Tokenized QA examples; ``labels`` are -100 everywhere but the answer (and its EOS).

    The order of question and context is drawn per (seed, epoch, index), so a
    resumed run sees the same examples; call :meth:`set_epoch` at each epoch.

    Args:
        records: the examples.
        tokenizer: a transformers tokenizer with an EOS token.
        seq_len: maximum example length; the context is cut to fit.
        question_first_p: probability the question comes before the context (paper: 0.5).
        seed: seed of the order coins.
    """

    records: list[QARecord]
    tokenizer: Any
    seq_len: int
    question_first_p: float = 0.5
    seed: int = 0
    epoch: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; it is needed to end the answer")
        self._prefix = self.tokenizer("", add_special_tokens=True)["input_ids"]  # BOS, if the model uses one

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def question_first(self, index: int) -> bool:
        return random.Random(f"{self.seed}:{self.epoch}:{index}").random() < self.question_first_p

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def encode(self, record: QARecord, question_first: bool) -> dict[str, torch.Tensor]:
        """Tokenize one example; returns ``input_ids`` and ``labels``, each ``(T,)`` with T <= seq_len."""
        context = self._ids(record.context)
        question = self._ids(QUESTION.format(question=record.question))
        head = self._ids(CONTEXT_HEAD)
        tail = self._ids(CONTEXT_TAIL)
        prompt_end = self._ids(ANSWER_CUE)
        answer = self._ids(" " + record.answer) + [self.tokenizer.eos_token_id]
        fixed = len(self._prefix) + len(question) + len(head) + len(tail) + len(prompt_end) + len(answer)
        room = self.seq_len - fixed
        if room < 0:
            raise ValueError(
                f"a QA example needs {fixed} tokens without its context, more than --seq-len {self.seq_len}"
            )
        context_part = head + context[:room] + tail
        body = question + context_part if question_first else context_part + question
        prompt = self._prefix + body + prompt_end
        ids = prompt + answer
        labels = [IGNORE_INDEX] * len(prompt) + answer
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.encode(self.records[index], self.question_first(index))


@dataclass(frozen=True)
class QACollator:
    """Right-pad QA examples: ``input_ids`` with ``pad_token_id``, ``labels`` with -100.

    Returns ``input_ids``, ``labels`` and ``attention_mask``, each ``(B, T_max)``.
    """

    pad_token_id: int

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n] = item["input_ids"]
            labels[row, :n] = item["labels"]
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def answer_batches(records: list[QARecord], tokenizer: Any, batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """Labelled batches for the loss on the answers: the evaluation's context-first prompt
    (:func:`qa_prompt_ids`) followed by the first answer and EOS, labelled on those only.

    Records of similar length are batched together (right-padded by :class:`QACollator`); no context is cut,
    so ``batch_size`` bounds the memory of long contexts. The loss is per token: longer answers weigh more.

    Returns:
        Batches with ``input_ids``, ``labels`` and ``attention_mask``, for
        :func:`kvroute.train.losses.mean_loss`.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if not records:
        raise ValueError("no QA records to score")
    dataset = QADataset(records, tokenizer, seq_len=sys.maxsize, question_first_p=0.0)
    items = sorted((dataset.encode(r, question_first=False) for r in records), key=lambda x: len(x["input_ids"]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [QACollator(pad)(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


#: seed of the train/validation split of QA records: fixed, so runs with different ``--seed``
#: are scored on the same held-out records
SPLIT_SEED = 0


def load_qa_splits(
    sources: list[str], tokenizer: Any, seq_len: int, val_fraction: float = 0.05, seed: int = 0
) -> tuple[QADataset, QADataset]:
    """Training and validation datasets of QA records: read, split and tokenized on access.

    The split does not depend on ``seed`` (:data:`SPLIT_SEED`); ``seed`` only drives the
    per-example prompt layout.

    Example:
        >>> train, val = load_qa_splits(["qa.jsonl"], tok, seq_len=512)  # doctest: +SKIP
    """
    train, val = split_records(read_qa(sources), val_fraction, SPLIT_SEED)
    return QADataset(train, tokenizer, seq_len, seed=seed), QADataset(val, tokenizer, seq_len, seed=seed + 1)
