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

    def ints(self, codes: torch.Tensor) -> torch.Tensor:
        """Stored codes as one int8 integer per element (int4: unpacked; element 2i is the low nibble)."""
        if self.bits == 8:
            return codes
        return torch.stack(((codes & 15).to(torch.int8) - 8, (codes >> 4).to(torch.int8) - 8), -1).flatten(-2)

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
        ints = self.ints(codes)
        if scale.dtype == dtype or dtype == torch.float32:  # exact products (8 x 11 bits), rounded once
            out.copy_(ints)
            out.mul_(scale.to(dtype))
        else:
            torch.mul(ints, scale.float(), out=out)
        return out


@dataclass(frozen=True)
class QuantizedHistory:
    """One owner layer's keys (or values) as a quantized cache holds them: the codes and scales of
    the older tokens, followed by the newest ``rest`` in full precision.

    Shapes: codes ``(B, H_kv, T_q, D)`` (int4: ``D/2``), scale ``(B, H_kv, T_q, 1)``, rest
    ``(B, H_kv, T_r, D)`` in the cache's dtype.
    """

    quant: KVQuant
    codes: torch.Tensor
    scale: torch.Tensor
    rest: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """``(B, H_kv, T_q + T_r, D)``: the dequantized history followed by the residual, in one new tensor."""
        old, rest = self.codes.shape[-2], self.rest
        out = rest.new_empty((*rest.shape[:-2], old + rest.shape[-2], rest.shape[-1]))
        self.quant.dequantize(self.codes, self.scale, rest.dtype, out=out[:, :, :old])
        out[:, :, old:].copy_(rest)
        return out

    def _codes_as(self, dtype: torch.dtype) -> torch.Tensor:
        return self.quant.ints(self.codes).to(dtype)  # exact: |code| <= 127 fits any float type


def attend_one_token(query: torch.Tensor, keys: QuantizedHistory, values: QuantizedHistory,
                     mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Attention of one query token per sequence over a quantized history, without dequantizing it.

    Scores are ``q . codes`` times each key's scale, and the value scales multiply the attention
    probabilities, so the history is only cast to the query's dtype, never multiplied: about a
    third of what dequantizing costs a CPU decode step (``benchmarks/int8_attention.py``). The
    result equals attention over the dequantized history up to rounding; scores and softmax
    are float32.

    Args:
        query: ``(B, H_kv, G, D)``: each KV head's group of query heads as rows (packed GQA).
        mask: None, or ``(B, 1, 1, >=T)`` boolean (True: attend) or additive.
    Returns:
        ``(B, H_kv, G, D)`` in the query's dtype.
    """
    dtype, old = query.dtype, keys.codes.shape[-2]
    q = query * scaling
    scores = (q @ keys.rest.transpose(-1, -2)).float()
    if old:
        history = (q @ keys._codes_as(dtype).transpose(-1, -2)).float() * keys.scale.float().transpose(-1, -2)
        scores = torch.cat((history, scores), -1)
    if mask is not None:
        mask = mask[..., : scores.shape[-1]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    probs = scores.softmax(-1)
    out = probs[..., old:].to(dtype) @ values.rest
    if old:
        weights = (probs[..., :old] * values.scale.float().transpose(-1, -2)).to(dtype)
        out = out + weights @ values._codes_as(dtype)
    return out
