"""Evaluation data: held-out text files, context-QA JSONL, multiple choice (JSONL or BIG-bench).

Every loader checks its input and fails with a message that names the file, the
line and what is missing, so a bad file is caught before any model is loaded.

Formats:
- text: a ``.txt`` file, a folder (its ``*.txt`` files, sorted) or a glob;
- QA JSONL: ``{"context", "question", "answer"}`` per line (``answer`` a string or
  a list of acceptable strings);
- multiple choice JSONL: ``{"context", "choices", "answer"}`` per line (``answer`` the
  index of the right choice or its text);
- BIG-bench ``task.json``: the examples with ``target_scores`` (the best-scored
  choice is the answer), prompts built with the task's prefixes.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvroute.data.jsonl import iter_jsonl
from kvroute.data.text import read_text_file

QA_FIELDS = ("context", "question", "answer")
MC_FIELDS = ("context", "choices", "answer")


@dataclass(frozen=True)
class TextSet:
    """Held-out text: one document per file."""

    path: str
    files: tuple[str, ...]
    texts: tuple[str, ...]


@dataclass(frozen=True)
class QAExample:
    id: str
    context: str
    question: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class MCExample:
    """A prompt and its choices; the score of a choice is log p(delimiter + choice | context)."""

    id: str
    context: str
    choices: tuple[str, ...]
    answer: int
    delimiter: str = " "


def load_text(path: str | Path) -> TextSet:
    """Read a text file, every ``*.txt`` of a folder, or the files a glob matches."""
    text = str(path)
    p = Path(text)
    if p.is_dir():
        files = sorted(str(f) for f in p.glob("*.txt"))
    elif p.is_file():
        files = [text]
    else:
        files = sorted(glob.glob(text))
        if not files and not any(ch in text for ch in "*?["):
            raise FileNotFoundError(f"text data not found: {text}")
    if not files:
        raise ValueError(f"text data {text!r}: no .txt files found")
    texts = [read_text_file(f) for f in files]
    kept = [(f, t) for f, t in zip(files, texts) if t.strip()]
    if not kept:
        raise ValueError(f"text data {text!r}: every file is empty")
    return TextSet(text, tuple(f for f, _ in kept), tuple(t for _, t in kept))


def _read_jsonl(path: str | Path, fields: tuple[str, ...], kind: str) -> list[tuple[int, dict[str, Any]]]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{kind} data not found: {p}")
    rows = []
    for lineno, row in iter_jsonl(p, f"a JSON object with fields {', '.join(fields)}"):
        missing = [k for k in fields if k not in row]
        if missing:
            raise ValueError(
                f"{p}:{lineno}: missing field(s) {', '.join(map(repr, missing))}; "
                f"a {kind} record needs {', '.join(fields)}"
            )
        rows.append((lineno, row))
    if not rows:
        raise ValueError(f"{p}: empty dataset (no {kind} records)")
    return rows


def load_qa(path: str | Path, limit: int | None = None) -> list[QAExample]:
    """Read context-QA JSONL ``{context, question, answer}``."""
    out = []
    for lineno, row in _read_jsonl(path, QA_FIELDS, "QA"):
        answer = row["answer"]
        answers = (answer,) if isinstance(answer, str) else tuple(answer) if isinstance(answer, list) else ()
        if not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{path}:{lineno}: 'answer' must be a string or a non-empty list of strings")
        out.append(QAExample(str(row.get("id", lineno)), str(row["context"]), str(row["question"]), answers))
    return out[:limit] if limit else out


def load_mc(path: str | Path, limit: int | None = None) -> list[MCExample]:
    """Read multiple choice JSONL ``{context, choices, answer}`` or a BIG-bench ``task.json``."""
    p = Path(path)
    if p.suffix == ".json":
        out = _load_bigbench(p)
    else:
        out = []
        for lineno, row in _read_jsonl(p, MC_FIELDS, "multiple choice"):
            choices, answer = row["choices"], row["answer"]
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise ValueError(f"{p}:{lineno}: 'choices' must be a list of at least 2 strings")
            if isinstance(answer, str):
                if answer not in choices:
                    raise ValueError(f"{p}:{lineno}: answer {answer!r} is not one of the choices")
                answer = choices.index(answer)
            if not isinstance(answer, int) or not 0 <= answer < len(choices):
                raise ValueError(f"{p}:{lineno}: 'answer' must be a choice index in 0..{len(choices) - 1} or a choice")
            context, delimiter = _prompt_and_delimiter(str(row["context"]))
            out.append(MCExample(str(row.get("id", lineno)), context, tuple(choices), answer, delimiter))
    return out[:limit] if limit else out


def _prompt_and_delimiter(context: str) -> tuple[str, str]:
    """Move trailing spaces of a prompt into the delimiter before each choice, as lm-eval does."""
    stripped = context.rstrip(" ")
    if stripped != context:
        return stripped, " "
    return context, "" if not context or context[-1].isspace() else " "


def _load_bigbench(p: Path) -> list[MCExample]:
    if not p.is_file():
        raise FileNotFoundError(f"multiple choice data not found: {p}")
    try:
        task = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{p}: not valid JSON ({err.msg})") from None
    if not isinstance(task, dict) or "examples" not in task:
        subtasks = sorted(str(f) for f in p.parent.glob("*/task.json"))
        hint = f"; this task keeps them in its subtasks: {', '.join(subtasks)}" if subtasks else ""
        raise ValueError(f"{p}: a BIG-bench task.json needs an 'examples' list{hint}")
    prefix = task.get("task_prefix", "")
    q_prefix = task.get("example_input_prefix", "\nQ: ")
    a_prefix = task.get("example_output_prefix", "\nA: ")
    choice_prefix = task.get("choice_prefix", "\n  choice: ")
    append_choices = task.get("append_choices_to_input", True)
    out = []
    for i, ex in enumerate(task["examples"]):
        scores = ex.get("target_scores")
        if not scores or "input" not in ex:
            continue
        choices = list(scores)
        best = max(range(len(choices)), key=lambda j: scores[choices[j]])
        body = ex["input"] + ("".join(choice_prefix + c for c in choices) if append_choices else "")
        context = (prefix + q_prefix + body + a_prefix).lstrip("\n")
        ctx, delim = _prompt_and_delimiter(context)
        out.append(MCExample(str(i), ctx, tuple(choices), best, delim))
    if not out:
        raise ValueError(f"{p}: empty dataset (no examples with 'input' and 'target_scores')")
    return out


def tokenize_documents(
    tokenizer: Any, texts: tuple[str, ...] | list[str], max_tokens: int | None = None
) -> list[list[int]]:
    """Token ids per document, stopping once ``max_tokens`` tokens are taken."""
    docs: list[list[int]] = []
    taken = 0
    for text in texts:
        ids = tokenizer(text, verbose=False)["input_ids"]
        if max_tokens is not None:
            ids = ids[: max_tokens - taken]
        if len(ids) >= 2:
            docs.append(list(ids))
            taken += len(ids)
        if max_tokens is not None and taken >= max_tokens:
            break
    return docs
