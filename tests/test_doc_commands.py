"""Every `kvroute ...` command in the README and docs/ parses, and its config validates.

The commands are what users copy. A renamed flag, a routing spec the parser no longer takes, or a
value a config now rejects would break them silently; here it fails. Nothing runs: the test stops
at the config each command builds (``TrainConfig``, ``CalibrationConfig``, ``EvalConfig``), whose
checks touch no files (a command that reads ``--config FILE`` is only parsed).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from kvroute.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(?:bash|sh|console)?\n(.*?)^```", re.DOTALL | re.MULTILINE)


def doc_commands() -> list[tuple[str, str]]:
    """``(where, command line)`` for each `kvroute` command in the README's and docs' shell blocks."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]:
        text = path.read_text(encoding="utf-8")
        for block in FENCE.finditer(text):
            first = text.count("\n", 0, block.start(1)) + 1  # the file line of the block's first line
            lines = block.group(1).splitlines()
            n = 0
            while n < len(lines):
                start, line = n, lines[n].strip()
                while line.endswith("\\") and n + 1 < len(lines):  # a continued command
                    n += 1
                    line = line[:-1] + " " + lines[n].strip()
                n += 1
                line = re.sub(r"\s+#\s.*$", "", line)  # a trailing comment
                if line.startswith("kvroute ") and "..." not in line:  # `...` elides flags on purpose
                    found.append((f"{path.relative_to(ROOT)}:{first + start}", line))
    return found


COMMANDS = doc_commands()


def test_the_docs_have_commands() -> None:
    # the extraction itself: the README's CLI section and docs/training.md hold dozens
    assert len(COMMANDS) >= 30
    assert any(line.startswith("kvroute train ") for _, line in COMMANDS)
    assert any(line.startswith("kvroute calibrate ") for _, line in COMMANDS)


@pytest.mark.parametrize("where,line", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_doc_command_parses_and_validates(where: str, line: str) -> None:
    argv = shlex.split(line)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"{where}: `{line}` does not parse (exit {exit_.code})")
    if getattr(args, "config", None):
        return  # the values come from a file the docs only name
    if args._config:  # train, calibrate, eval: the config the command would run with
        args._config(args)


def test_a_broken_command_fails() -> None:
    # what the parametrized test relies on: a wrong flag exits, a bad value raises
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "m", "--data", "d", "--no-such-flag"])
    args = build_parser().parse_args(["train", "m", "--data", "d", "--routing", "rcla", "--seq-unlikelihood", "1"])
    with pytest.raises(ValueError, match="seq-unlikelihood"):
        args._config(args)
    args = build_parser().parse_args(["calibrate", "m", "--data", "d"])  # neither --plans nor --pairs
    with pytest.raises(ValueError, match="--plans"):
        args._config(args)
