"""Which precision training and calibration run in: ``fp32``, ``bf16`` (autocast) or ``auto``.

``auto`` picks bf16 autocast where the device runs bfloat16 matmuls natively: a CUDA GPU that
supports bf16, or a CPU with AMX-BF16 or AVX512-BF16 (there a SmolLM2 training step takes
about 0.6x the fp32 time, and held-out quality matched fp32; docs/RESULTS.md). Anywhere else
bf16 is emulated and slower than fp32, so ``auto`` stays in fp32.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Literal, get_args

import torch

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS = get_args(Precision)
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def _cpuinfo_fields(cpuinfo: str) -> dict[str, str]:
    """The first processor's ``key: value`` lines of ``/proc/cpuinfo`` (empty when unreadable)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux: no way to tell cheaply
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the end of the first processor's block
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU has native bfloat16 matmul instructions (AMX-BF16 or AVX512-BF16)."""
    flags = set(_cpuinfo_fields(cpuinfo).get("flags", "").split())
    return any(f in flags for f in CPU_BF16_FLAGS)


@functools.lru_cache(maxsize=1)
def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (``/proc/cpuinfo``), else :func:`platform.processor`, else ``"unknown"``.

    Timings are only comparable on the same kind of CPU: one without native bf16 trains in fp32
    under ``--precision auto``, several times slower. Reports record this next to their threads.
    """
    return _cpuinfo_fields(cpuinfo).get("model name") or platform.processor() or "unknown"


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``"bf16"`` or ``"fp32"`` for ``precision`` (one of :data:`PRECISIONS`) on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if kind == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


def autocast(precision: str, device: torch.device | str):
    """bf16 autocast on ``device`` when ``precision`` resolves to bf16, else a no-op context.

    Run gradient-free work under it with :func:`torch.no_grad`, not :func:`torch.inference_mode`:
    in inference mode autocast does not keep its bf16 copies of the weights, so every forward
    casts every weight again (greedy decoding then ran slower than in fp32; tested).
    """
    device = torch.device(device)
    return torch.autocast(device.type, torch.bfloat16, enabled=resolve_precision(precision, device) == "bf16")
