"""Multiple choice data: JSONL ``{context, choices, answer}`` or a BIG-bench ``task.json``.

- JSONL: one record per line; ``answer`` is the index of the right choice or its text;
- BIG-bench ``task.json``: the examples with ``target_scores`` (the best-scored choice is
  the answer), prompts built with the task's prefixes.

Errors name the file, the line and what is missing, so a bad file is caught before any
model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvroute.data.jsonl import iter_records, read_json

MC_FIELDS = ("context", "choices", "answer")


@dataclass(frozen=True)
class MCExample:
    """A prompt and its choices; the score of a choice is log p(delimiter + choice | context)."""

    id: str
    context: str
    choices: tuple[str, ...]
    answer: int
    delimiter: str = " "


def load_mc(path: str | Path, limit: int | None = None) -> list[MCExample]:
    """Read multiple choice JSONL ``{context, choices, answer}`` or a BIG-bench ``task.json``."""
    p = Path(path)
    if p.suffix == ".json":
        out = _load_bigbench(p)
    else:
        if not p.is_file():
            raise FileNotFoundError(f"multiple choice data not found: {p}")
        out = []
        for lineno, row in iter_records(p, MC_FIELDS, "multiple choice"):
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
        if not out:
            raise ValueError(f"{p}: empty dataset (no multiple choice records)")
    return out[:limit] if limit else out


def _prompt_and_delimiter(context: str) -> tuple[str, str]:
    """Move trailing spaces of a prompt into the delimiter before each choice, as lm-eval does."""
    stripped = context.rstrip(" ")
    if stripped != context:
        return stripped, " "
    return context, "" if not context or context[-1].isspace() else " "


def _load_bigbench(p: Path) -> list[MCExample]:
    task = read_json(p, "multiple choice data")
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
