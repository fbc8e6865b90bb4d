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
        code = int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"kvroute {args.command}: error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"kvroute {args.command}: interrupted", file=sys.stderr)
        code = 130
    return leave_process_group(code)


def leave_process_group(code: int) -> int:
    """End a process that ran in a torch.distributed group (a ``torchrun`` rank) without finalizing Python.

    Gloo's worker threads can still hold the last reference to a finished collective's tensors when
    the command returns; a thread that drops it while the interpreter shuts down cannot take the GIL,
    and the rank aborts after its work is done ("terminate called without an active exception",
    exit -6), so torchrun reports the run as failed. ``experiments/gloo_exit.py`` counts it in a
    two-rank gloo program; ``kvroute train --fsdp`` did it in 2 of 4 CI runs. ``destroy_process_group``
    cured the program but not ``kvroute train --fsdp`` (likely because FSDP's state still holds the
    group). So a rank flushes what it printed and logged and leaves with ``os._exit``; every file a
    command writes is closed before it returns. Outside a group of two or more processes (no group, or
    a one-process group such as an in-process engine's, whose shutdown may run at exit) this returns
    ``code`` and the process ends as usual.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return code
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
