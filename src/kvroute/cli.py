"""The ``kvroute`` command: maps subcommands to library functions, nothing else."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import kvroute.commands


def _commands() -> list:
    modules = []
    for info in sorted(pkgutil.iter_modules(kvroute.commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            modules.append(importlib.import_module(f"kvroute.commands.{info.name}"))
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvroute",
        description="Depth-wise KV-cache sharing with stochastic KV routing (R-CLA).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _commands():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.configure(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"kvroute {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kvroute {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
