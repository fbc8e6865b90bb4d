"""Run jobs as parallel worker processes, one log each: the demo's stages and the experiments' runs.

Each worker is a Python command line (the calling script itself with an argument naming the job);
the jobs' own caching (finished runs and calibrations are reused) makes a rerun after a crash do
only what is missing. A failed job does not stop the others, but the jobs that need it are not
started; the names of the failed (and not started) jobs are returned so the caller can exit
non-zero after collecting what finished.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Callable


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def last_line(path: Path, width: int = 110) -> str:
    """The last line a log shows (a progress bar's latest redraw counts as a line), cut to ``width``."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [s.strip() for s in tail.replace("\r", "\n").split("\n") if s.strip()]
    return lines[-1][:width] if lines else ""


def _check_needs(names: list[str], needs: Mapping[str, Collection[str]]) -> None:
    order = {n: i for i, n in enumerate(names)}
    for name, wanted in needs.items():
        if name not in order:
            raise ValueError(f"needs: {name!r} is not a job")
        for w in wanted:
            if w not in order:
                raise ValueError(f"needs: {name!r} needs {w!r}, which is not a job")
            if order[w] >= order[name]:  # listed first: no cycles, and the order is the priority
                raise ValueError(f"needs: {name!r} needs {w!r}, which must be listed before it")


def run_parallel(names: list[str], worker_args: Callable[[str], list[str]], log_dir: Callable[[str], Path],
                 jobs: int, threads: int = 1, on_done: Callable[[str], None] | None = None,
                 poll_s: float = 5.0, needs: Mapping[str, Collection[str]] | None = None,
                 exclusive: Collection[str] = (), seconds: dict[str, float] | None = None,
                 progress_s: float | None = None) -> list[str]:
    """Run ``python *worker_args(name)`` for every name, ``jobs`` at a time, ``threads`` threads each.

    Args:
        names: the jobs, in priority order: when a worker slot frees, the first job that can start does.
        log_dir: ``log_dir(name)/run.log`` gets each worker's output (appended).
        on_done: called after each successful worker (e.g. to rewrite the result JSON).
        needs: name -> the jobs it starts after (each listed before it); when one of them fails, it is
            not started.
        exclusive: jobs that run alone, with ``jobs * threads`` threads: work that two threads speed up
            more than running beside another job does. Once one can start, no other job starts until it has.
        seconds: filled with each finished job's wall seconds.
        progress_s: every this many seconds, log each running job's latest log line (None: never).

    Returns:
        The names whose worker failed, then those not started because a job they need failed.
    """
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    needs = {n: tuple(w) for n, w in (needs or {}).items()}
    _check_needs(names, needs)
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           "TOKENIZERS_PARALLELISM": "false"}
    pending, active, done, failed, skipped = list(names), {}, set(), [], []
    started: dict[str, float] = {}
    last_progress = time.time()

    def start(name: str, n_threads: int) -> None:
        folder = log_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        worker_env = {**env, "OMP_NUM_THREADS": str(n_threads), "MKL_NUM_THREADS": str(n_threads)}
        with (folder / "run.log").open("a") as logf:
            active[name] = subprocess.Popen([sys.executable, *worker_args(name)], stdout=logf,
                                            stderr=subprocess.STDOUT, env=worker_env)
        started[name] = time.time()
        alone = f", alone with {n_threads} threads" if name in exclusive and jobs > 1 else ""
        log(f"started {name}{alone} (log: {folder / 'run.log'})")

    try:
        while pending or active:
            for name in list(pending):  # jobs whose needs failed are dropped, whatever their place
                lost = [w for w in needs.get(name, ()) if w in failed or w in skipped]
                if lost:
                    pending.remove(name)
                    skipped.append(name)
                    log(f"{name}: not started, it needs {', '.join(lost)}, which did not finish")
            for name in list(pending):
                if any(n in exclusive for n in active):
                    break
                if not all(w in done for w in needs.get(name, ())):
                    continue
                if name in exclusive:
                    if not active:
                        pending.remove(name)
                        start(name, jobs * threads)
                    break  # it waits for the running jobs to end; nothing else starts before it
                if len(active) >= jobs:
                    break
                pending.remove(name)
                start(name, threads)
            if not active:
                if pending:  # cannot happen once needs are checked; never spin
                    raise RuntimeError(f"jobs {pending} can never start")
                break
            time.sleep(poll_s)
            for name, proc in list(active.items()):
                if proc.poll() is None:
                    continue
                del active[name]
                took = time.time() - started[name]
                if seconds is not None:
                    seconds[name] = round(took, 1)
                if proc.returncode:
                    failed.append(name)
                    log(f"{name}: FAILED (exit {proc.returncode}) after {took / 60:.1f} min, see "
                        f"{log_dir(name) / 'run.log'}")
                else:
                    done.add(name)
                    log(f"{name}: finished in {took / 60:.1f} min")
                    if on_done is not None:
                        on_done(name)
            if progress_s is not None and active and time.time() - last_progress >= progress_s:
                last_progress = time.time()
                for name in active:
                    log(f"  {name}: {last_line(log_dir(name) / 'run.log') or '(no output yet)'}")
    finally:  # Ctrl-C, SIGTERM turned into SystemExit, or a failing callback: no worker left training
        for proc in active.values():
            proc.terminate()
        for proc in active.values():
            proc.wait()
    return failed + skipped
