"""One table of the dtype names kvroute accepts: bytes per element, and the torch dtype for loading.

``dtype_bytes`` serves memory accounting (any storage dtype, fp8 and int8 included) without
importing torch; ``resolve_dtype`` serves model loading (float32, bfloat16 and float16 only).
"""

from __future__ import annotations

from typing import Any

#: name -> (torch dtype attribute, bytes per element, loadable as model weights)
DTYPES: dict[str, tuple[str, int, bool]] = {
    "float32": ("float32", 4, True), "fp32": ("float32", 4, True), "float": ("float32", 4, False),
    "bfloat16": ("bfloat16", 2, True), "bf16": ("bfloat16", 2, True),
    "float16": ("float16", 2, True), "fp16": ("float16", 2, True), "half": ("float16", 2, False),
    "float8": ("float8_e4m3fn", 1, False), "fp8": ("float8_e4m3fn", 1, False), "int8": ("int8", 1, False),
}
LOADABLE = tuple(name for name, (_, _, loadable) in DTYPES.items() if loadable)


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element for a torch dtype or its name (``"bf16"``, ``torch.float32``)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name][1]


def resolve_dtype(dtype: Any):
    """The torch dtype to load weights in, from a torch dtype or one of :data:`LOADABLE`."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in LOADABLE:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(LOADABLE)}")
    return getattr(torch, DTYPES[dtype][0])
