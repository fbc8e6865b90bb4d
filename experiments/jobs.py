"""Run an experiment's runs as parallel worker processes (``--jobs N``), one log per run.

Each worker is the experiment script itself with ``--one NAME``; the runs' own
caching (finished runs are skipped) makes a rerun after a crash do only what is
missing. A failed run does not stop the others; the names of the failed runs are
returned so the caller can exit non-zero after collecting what finished.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_parallel(names: list[str], worker_args: Callable[[str], list[str]], log_dir: Callable[[str], Path],
                 jobs: int, threads: int = 1, on_done: Callable[[str], None] | None = None,
                 poll_s: float = 5.0) -> list[str]:
    """Run ``python SCRIPT *worker_args(name)`` for every name, ``jobs`` at a time.

    ``log_dir(name)/run.log`` gets each worker's output (appended). ``on_done(name)`` is
    called after each successful worker (e.g. to rewrite the result JSON). Returns the
    names whose worker failed.
    """
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), "TOKENIZERS_PARALLELISM": "false"}
    pending, active, failed = list(names), {}, []
    try:
        while pending or active:
            while pending and len(active) < jobs:
                name = pending.pop(0)
                folder = log_dir(name)
                folder.mkdir(parents=True, exist_ok=True)
                with (folder / "run.log").open("a") as logf:
                    active[name] = subprocess.Popen([sys.executable, *worker_args(name)], stdout=logf,
                                                    stderr=subprocess.STDOUT, env=env)
                log(f"started {name} (log: {folder / 'run.log'})")
            time.sleep(poll_s)
            for name, proc in list(active.items()):
                if proc.poll() is None:
                    continue
                del active[name]
                if proc.returncode:
                    failed.append(name)
                    log(f"{name}: FAILED (exit {proc.returncode}), see {log_dir(name) / 'run.log'}")
                else:
                    log(f"{name}: finished")
                    if on_done is not None:
                        on_done(name)
    except KeyboardInterrupt:
        for proc in active.values():
            proc.terminate()
        raise
    return failed
