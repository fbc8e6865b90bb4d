"""Command-line flags generated from a config dataclass, and config files.

Each field of a ``@dataclass`` config becomes one flag: its name from the field
(``max_steps`` -> ``--max-steps``), its type and choices from the annotation (``bool``
-> a switch, ``--no-X`` when the default is True; ``list`` -> one or more values;
``tuple[float, float]`` -> two; ``Literal[...]`` -> choices), its help from the
dataclass docstring's ``Args:`` section (the one place field docs live), its default
from the field. Precedence: field defaults < ``--config FILE`` (TOML or YAML) < flags.

Example:
    >>> parser = argparse.ArgumentParser()
    >>> add_config_flags(parser, TrainConfig, skip={"model"})  # doctest: +SKIP
    >>> config = config_from_args(TrainConfig, parser.parse_args(argv))  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

#: dests every config command adds besides its fields
CONFIG_FLAG = "config"


def field_docs(cls: type) -> dict[str, str]:
    """``{field: text}`` from the ``Args:`` section of ``cls``'s docstring (``a, b: text`` documents both)."""
    docs: dict[str, str] = {}
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:") + 1
    except StopIteration:
        return docs
    names: list[str] = []
    for line in lines[start:]:
        if line.strip() and not line.startswith(" "):
            break  # the next section (Returns:, Example:, ...)
        entry = re.match(r"^ {4}(\w[\w, ]*):\s*(.*)$", line)
        if entry:
            names = [n.strip() for n in entry.group(1).split(",")]
            for name in names:
                docs[name] = entry.group(2)
        elif line.strip():
            for name in names:
                docs[name] += " " + line.strip()
    return {name: _plain(text) for name, text in docs.items()}


def _plain(text: str) -> str:
    """reST markup out of a docstring line: ``x`` -> x, :func:`~a.b` -> a.b; ``%`` escaped for argparse."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "")
    return text.replace("%", "%%")


def _base_type(annotation: Any) -> Any:
    """``X | None`` -> X; a union with ``str`` -> str (a comma-separated value on the command line)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if str in rest:
            return str
        return rest[0] if len(rest) == 1 else str
    return annotation


def add_config_flags(parser: argparse.ArgumentParser, cls: type, *, skip: set[str] | frozenset[str] = frozenset(),
                     groups: dict[str, str] | None = None, config_file: bool = True,
                     **overrides: dict[str, Any]) -> None:
    """Add ``--config FILE`` and one flag per field of dataclass ``cls`` to ``parser``.

    Args:
        parser: the subcommand's parser.
        cls: the config dataclass.
        skip: fields the command declares itself (positionals, say).
        groups: field -> argument group title (the group is made on first use, or found by its title).
        config_file: add ``--config FILE`` (False for a second config class on the same parser).
        overrides: field -> keyword arguments for ``add_argument`` that replace the generated ones;
            ``flags=[...]`` replaces the option strings (``["--output-dir", "-o"]``: the first is the
            name shown, the others aliases), ``type=`` parses the text (:func:`comma_list`), ``None`` drops
            a generated keyword (``nargs=None, action=None``: one value, stored).

    Flags default to ``argparse.SUPPRESS``, so :func:`config_from_args` sees only what was typed.
    A field whose dest the parser has already (one shared by two config classes) gets no second flag.
    """
    if config_file:
        parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                            help="TOML or YAML file setting any of the options below (flags override it)")
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    made: dict[str, Any] = {g.title: g for g in parser._action_groups}
    taken = flag_dests(parser)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name in taken:
            continue
        kwargs = _flag_kwargs(f, _base_type(hints[f.name]), docs.get(f.name, ""))
        kwargs.update(overrides.get(f.name, {}))
        flags = kwargs.pop("flags")
        title = (groups or {}).get(f.name)
        if title is not None and title not in made:
            made[title] = parser.add_argument_group(title)
        target = parser if title is None else made[title]
        target.add_argument(*flags, **{k: v for k, v in kwargs.items() if v is not None})  # None: left out


def _flag_kwargs(f: dataclasses.Field, kind: Any, doc: str) -> dict[str, Any]:
    dashed = "--" + f.name.replace("_", "-")
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": doc, "flags": [dashed]}
    if kind is bool:
        kwargs["action"] = "store_false" if default else "store_true"
        kwargs["flags"] = ["--no-" + f.name.replace("_", "-")] if default else [dashed]
        if default:
            kwargs["help"] = f"{doc.rstrip('.')} (on by default; this flag turns it off)".lstrip()
        return kwargs
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Literal:
        kwargs["choices"] = list(args)
        kind = type(args[0])
    elif origin is tuple and args and args[-1] is not Ellipsis:
        kwargs["nargs"], kind = len(args), args[0]
    elif origin in (list, tuple):
        kwargs["nargs"], kwargs["action"], kind = "+", "extend", args[0] if args else str
    kwargs["type"] = kind if kind in (int, float) else None
    if default not in (None, (), []) and f.default_factory is dataclasses.MISSING:
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        kwargs["help"] = f"{doc.rstrip('.')} (default: {shown})".lstrip()
    return kwargs


def comma_list(kind: type = str) -> Any:
    """An argparse ``type`` reading ``512,1024`` as ``[512, 1024]`` (of ``kind``; empty items skipped)."""

    def parse(text: str) -> list[Any]:
        try:
            return [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {getattr(kind, '__name__', 'value')} values, got {text!r}") from None

    return parse


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a ``.toml``, ``.yaml`` or ``.yml`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config: no such file: {path}")
    if path.suffix == ".toml":
        import tomllib

        with path.open("rb") as fh:
            data = tomllib.load(fh)
    elif path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml), "
                             "or write the file as TOML") from None
        data = yaml.safe_load(path.read_text()) or {}
    else:
        raise ValueError(f"--config {path}: expected a .toml, .yaml or .yml file")
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values")
    return data


def config_values(cls: type, args: argparse.Namespace, *, also: tuple[type, ...] = ()) -> dict[str, Any]:
    """The settings for ``cls``: the ``--config`` file's values, then the flags typed (field names only).

    ``also``: other config classes of the same command; the file may set their fields too (left out here).
    """
    names = [f.name for f in dataclasses.fields(cls)]
    known = list(dict.fromkeys(names + [f.name for other in also for f in dataclasses.fields(other)]))
    values: dict[str, Any] = {}
    path = getattr(args, CONFIG_FLAG, None)
    if path is not None:
        for key, value in load_config_file(path).items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise ValueError(f"--config {path}: unknown option {key!r}; expected one of {', '.join(known)}")
            if name in names:
                values[name] = value
    values.update({name: getattr(args, name) for name in names if hasattr(args, name)})
    return values


def config_from_args(cls: type, args: argparse.Namespace, *, also: tuple[type, ...] = (), **extra: Any) -> Any:
    """``cls`` from field defaults < ``--config FILE`` < flags (< ``extra``); ``also``: see :func:`config_values`."""
    values = {**config_values(cls, args, also=also), **extra}
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(", ".join("--" + m.replace("_", "-") for m in missing) + ": required")
    return cls(**values)


def flag_dests(parser: argparse.ArgumentParser) -> set[str]:
    """Every dest a parser fills (positionals included), without ``help``."""
    return {a.dest for a in parser._actions if a.dest != "help"}


def warn(message: str) -> None:
    """A one-line notice on stderr (deprecations the CLI keeps for one release)."""
    print(f"kvroute: {message}", file=sys.stderr)
