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
        p.set_defaults(_run=module.run, _config=getattr(module, "config", None))  # _config: the validated config
    return parser


def quiet_libraries() -> None:
    """Silence the progress bars and notices of transformers and huggingface_hub (``--quiet``)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    if getattr(args, "quiet", False):
        quiet_libraries()
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
