"""How often a two-rank gloo run aborts at exit: as Python ends it, after ``destroy_process_group``, and
through ``kvroute.cli.leave_process_group``.

A rank that returns from its work while gloo's worker threads still hold the last reference to a
finished collective's tensors can abort as Python shuts down ("terminate called without an
active exception", exit -6); torchrun then reports the whole run as failed. ``kvroute`` ends each
rank with ``leave_process_group`` (``os._exit`` after flushing). This launches ``--runs`` rounds of
``torchrun --nproc_per_node 2`` runs of a small gloo program (200 all-gathers, an all-reduce, a
barrier) for each ending in turn: as Python ends it, after ``destroy_process_group()`` (no object
of the program holds the group then, unlike FSDP's state), and through ``leave_process_group``, and
counts the failed runs. Aborts are more frequent on a loaded machine. Appends to
experiments/results/gloo_exit.json:

    .venv/bin/python experiments/gloo_exit.py --runs 40
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT / "tests"))
from common import append_rows  # noqa: E402
from dist_helpers import free_port  # noqa: E402

RANK = """
import sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank = dist.get_rank()
for _ in range(200):
    outs = [torch.empty(1000) for _ in range(2)]
    dist.all_gather(outs, torch.full((1000,), float(rank)), async_op=True).wait()
dist.all_reduce(torch.ones(10))
dist.barrier()
if sys.argv[1] == "destroy":
    dist.destroy_process_group()
if sys.argv[1] == "leave":
    from kvroute.cli import leave_process_group

    leave_process_group(0)
"""


def launch(program: Path, ending: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(program), ending],
                          env=env, capture_output=True, text=True, timeout=300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="runs of each ending")
    args = parser.parse_args()
    failed = {"python": 0, "destroy": 0, "leave": 0}
    aborts = dict.fromkeys(failed, 0)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        program = Path(tmp) / "rank.py"
        program.write_text(RANK)
        for i in range(args.runs):
            for ending in failed:
                done = launch(program, ending)
                failed[ending] += done.returncode != 0
                aborts[ending] += "terminate called without an active exception" in done.stderr
            print(f"{i + 1}/{args.runs}: failed {failed}", flush=True)
    rows = [{"ending": e, "runs": args.runs, "failed": failed[e], "aborted_at_exit": aborts[e],
             "load_average": os.getloadavg()[0], "seconds": round(time.time() - start)} for e in failed]
    append_rows(ROOT / "experiments" / "results" / "gloo_exit.json", rows)
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
