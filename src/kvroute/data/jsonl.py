"""Reading JSON and JSONL record files with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def iter_jsonl(path: str | Path, expected: str = "a JSON object") -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, record)`` for each non-blank line of a JSONL file.

    Raises:
        ValueError: ``FILE:LINE: not valid JSON`` or ``FILE:LINE: expected <expected>``.
    """
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected {expected}")
            yield lineno, row


def iter_records(path: str | Path, fields: tuple[str, ...], kind: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """:func:`iter_jsonl`, checking that every record has ``fields``.

    Raises:
        ValueError: ``FILE:LINE: missing field(s) 'x'; a <kind> record needs <fields>``.
    """
    for lineno, row in iter_jsonl(path, f"a JSON object with fields {', '.join(fields)}"):
        missing = [k for k in fields if k not in row]
        if missing:
            raise ValueError(
                f"{path}:{lineno}: missing field(s) {', '.join(map(repr, missing))}; "
                f"a {kind} record needs {', '.join(fields)}"
            )
        yield lineno, row


def read_json(path: str | Path, kind: str, bad: str = "not valid JSON") -> Any:
    """The JSON document in ``path``.

    Raises:
        FileNotFoundError: ``<kind> not found: PATH``.
        ValueError: ``PATH: <bad> (<parser message>)``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{kind} not found: {p}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{p}: {bad} ({err.msg})") from None
