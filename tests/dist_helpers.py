"""Run ``kvroute train`` under torchrun (gloo, CPU) for the multi-process tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: list[str], timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc -m kvroute train ARGS`` on the CPU, one thread per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "kvroute", "train", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parent)
    if check and done.returncode != 0:
        raise AssertionError(f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done
