"""KV quantization of the owners' caches: int8 or int4 per token and KV head, with 16-bit scales.

Depth-wise sharing removes whole layers from the cache; quantization shrinks each entry that
remains, so the two multiply. Each token's key (and value) vector of one KV head is scaled by
its largest magnitude and rounded to a symmetric integer grid (int8: -127..127, int4: -7..7, two
per byte); the scale is kept in 16 bits (float16; bfloat16 when the cache is bfloat16). The
newest ``residual`` tokens of each sequence stay in full precision, as transformers' quantized
cache keeps them: attention to the most recent context is exact, and tokens are quantized
once, as they age out of the residual window.

Example:
    >>> q = KVQuant.parse("int8")
    >>> q.entry_bytes(head_dim=64)  # one token's key (or value) of one KV head: 64 B + a 2 B scale
    66
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

#: what ``--kv-quant`` accepts
KV_QUANTS = ("none", "int8", "int4")
#: newest tokens kept in full precision per sequence and owner layer
DEFAULT_RESIDUAL = 32


@dataclass(frozen=True)
class KVQuant:
    """How owner layers store KV: ``bits`` per element (8 or 4) and a full-precision residual window."""

    bits: int
    residual: int = DEFAULT_RESIDUAL

    def __post_init__(self) -> None:
        if self.bits not in (8, 4):
            raise ValueError(f"--kv-quant: {self.bits}-bit KV is not supported; use int8 or int4")
        if self.residual < 0:
            raise ValueError(f"the residual window must be >= 0 tokens, got {self.residual}")

    @classmethod
    def parse(cls, spec: Any) -> KVQuant | None:
        """``"int8"``, ``"int4"`` -> a KVQuant; ``None``, ``"none"`` -> None (full precision)."""
        if spec is None or isinstance(spec, KVQuant):
            return spec
        text = str(spec).strip().lower()
        if text in ("", "none"):
            return None
        if text in ("int8", "int4"):
            return cls(int(text[3:]))
        raise ValueError(f"--kv-quant must be one of {', '.join(KV_QUANTS)}, got {spec!r}")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def entry_bytes(self, head_dim: int) -> int:
        """Bytes of one quantized token's key (or value) for one KV head, scale included."""
        return (head_dim * self.bits + 7) // 8 + 2

    def split(self, tokens: int) -> tuple[int, int]:
        """(full-precision tokens, quantized tokens) a sequence of ``tokens`` holds."""
        full = min(tokens, self.residual)
        return full, tokens - full

    def quantize(self, x: torch.Tensor, scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (..., D) -> (codes, scales): int8 codes (int4: two per uint8, D/2), scales (..., 1) in
        ``scale_dtype`` (float16, or bfloat16 for a bfloat16 cache: 2 bytes either way)."""
        if scale_dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"KV scales are stored in float16 or bfloat16, not {scale_dtype}")
        scale = x.detach().abs().amax(-1, keepdim=True).float().clamp(min=1e-8) / self.qmax
        scale = scale.to(scale_dtype).float()  # the scale as stored, so that codes and scale agree exactly
        codes = (x.float() / scale).round().clamp(-self.qmax, self.qmax).to(torch.int8)
        if self.bits == 4:
            if codes.shape[-1] % 2:
                raise ValueError(f"int4 KV needs an even head size, got {codes.shape[-1]}")
            nibbles = (codes + 8).to(torch.uint8)
            codes = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
        return codes, scale.to(scale_dtype)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """(codes, scales) -> values in ``dtype``, written into ``out`` when given.

        Each value is the float32 product of code and scale, rounded once to ``dtype``. When the scale
        is already in ``dtype`` (or ``dtype`` is float32), that is a cast and an in-place multiply in
        ``dtype``: two light passes, with no float32 temporaries (the bandwidth a decode step pays).
        """
        shape = (*codes.shape[:-1], codes.shape[-1] * (2 if self.bits == 4 else 1))
        if out is None:
            out = torch.empty(shape, dtype=dtype, device=codes.device)
        elif tuple(out.shape) != shape or out.dtype != dtype:
            raise ValueError(f"dequantize: out is {tuple(out.shape)} {out.dtype}, expected {shape} {dtype}")
        ints = codes
        if self.bits == 4:  # element 2i is the low nibble, 2i+1 the high one
            ints = torch.stack(((codes & 15).to(torch.int8) - 8, (codes >> 4).to(torch.int8) - 8), -1).flatten(-2)
        if scale.dtype == dtype or dtype == torch.float32:  # exact products (8 x 11 bits), rounded once
            out.copy_(ints)
            out.mul_(scale.to(dtype))
        else:
            torch.mul(ints, scale.float(), out=out)
        return out
