"""SharedKVCache: a transformers ``Cache`` that stores KV for owner layers only.

Non-owner layers hold a ``DummyLayer`` (no tensors): they read their owner's KV
during the forward pass. Full-attention owners keep their KV in a preallocated
buffer that grows in place (doubling), so decode never copies the whole cache
per step; sliding-window owners use transformers' own bounded layer.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from kvroute.hf.compat import DummyLayer
from kvroute.kvquant import KVQuant
from kvroute.plan import KVShape, SharingPlan



class _BatchOps:
    """Beam search and batch expansion for a cache layer that applies ``fn`` to its tensors in ``_set_batch``."""

    def _set_batch(self, fn) -> None:
        raise NotImplementedError

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._set_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._set_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._set_batch(lambda t: t[indices])


def _grown(buffer: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
    """A (B, H, capacity, D) buffer holding the first ``length`` tokens of ``buffer``."""
    grown = buffer.new_empty((*buffer.shape[:2], capacity, buffer.shape[-1]))
    grown[:, :, :length] = buffer[:, :, :length]
    return grown


class GrowingLayer(_BatchOps, DynamicLayer):
    """A full-attention cache layer backed by a buffer that grows in place.

    Args:
        max_cache_len: tokens to preallocate; more are allowed and grow the buffer.
    """

    def __init__(self, max_cache_len: int | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.capacity = int(max_cache_len or 0)
        self.length = 0
        self._k: torch.Tensor | None = None  # (B, H_kv, capacity, D)
        self._v: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.capacity = max(self.capacity, key_states.shape[-2])
        b, h, _, d = key_states.shape
        self._k = key_states.new_empty((b, h, self.capacity, d))
        self._v = value_states.new_empty((b, value_states.shape[1], self.capacity, value_states.shape[-1]))
        self.length = 0
        self.is_initialized = True
        self._refresh()

    def _refresh(self) -> None:
        self.keys = self._k[:, :, : self.length]
        self.values = self._v[:, :, : self.length]

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new_capacity = max(needed, 2 * self.capacity)
        self._k, self._v = (_grown(x, self.length, new_capacity) for x in (self._k, self._v))
        self.capacity = new_capacity

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self._reserve(self.length + n)
        self._k[:, :, self.length : self.length + n] = key_states
        self._v[:, :, self.length : self.length + n] = value_states
        self.length += n
        self._refresh()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.length = 0
        if self.is_initialized:
            self._refresh()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if self.is_initialized and tokens_to_remove:
            self.length = max(0, self.length + tokens_to_remove)
            self._refresh()

    def _set_batch(self, fn) -> None:
        if self.is_initialized:
            self._k, self._v = fn(self._k), fn(self._v)
            self._refresh()

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()


class QuantizedLayer(_BatchOps, DynamicLayer):
    """A full-attention cache layer that stores KV quantized (:class:`~kvroute.kvquant.KVQuant`).

    The newest ``quant.residual`` tokens stay in full precision; older ones are quantized once,
    as they leave that window, into code and scale buffers that grow in place (preallocated
    for ``max_cache_len`` tokens when given, else grown by an eighth at a time). Attention reads
    the dequantized history followed by the residual.
    """

    def __init__(self, quant: KVQuant, max_cache_len: int | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.quant = quant
        self.length = 0
        self.quantized = 0  # tokens held in the code buffers
        self.capacity = max(0, int(max_cache_len or 0) - quant.residual)
        self._codes: list[torch.Tensor] = []  # keys, values: (B, H, capacity, D or D/2)
        self._scales: list[torch.Tensor] = []  # (B, H, capacity, 1), 16-bit
        self._rest: list[torch.Tensor] = []  # the full-precision residual: (B, H, T_r, D)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        # scales in the cache's dtype when it is bfloat16, so that dequantizing is a cast and a multiply
        self._scale_dtype = torch.bfloat16 if self.dtype == torch.bfloat16 else torch.float16
        self._rest = [key_states[:, :, :0], value_states[:, :, :0]]
        self._codes, self._scales = [], []
        for x in self._rest:
            codes, scale = self.quant.quantize(x, self._scale_dtype)
            self._codes.append(codes.new_empty((*codes.shape[:2], self.capacity, codes.shape[-1])))
            self._scales.append(scale.new_empty((*scale.shape[:2], self.capacity, 1)))
        self.quantized = 0
        self.is_initialized = True

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        capacity = max(needed, self.capacity + self.capacity // 8 + 64)
        self._codes = [_grown(x, self.quantized, capacity) for x in self._codes]
        self._scales = [_grown(x, self.quantized, capacity) for x in self._scales]
        self.capacity = capacity

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._rest = [torch.cat((old, new), dim=-2) for old, new in zip(self._rest, (key_states, value_states))]
        self.length += key_states.shape[-2]
        aged = self._rest[0].shape[-2] - self.quant.residual
        if aged > 0:  # tokens leaving the residual window are quantized, once
            q = self.quantized
            self._reserve(q + aged)
            for i, x in enumerate(self._rest):
                codes, scale = self.quant.quantize(x[:, :, :aged], self._scale_dtype)
                self._codes[i][:, :, q : q + aged] = codes
                self._scales[i][:, :, q : q + aged] = scale
                self._rest[i] = x[:, :, aged:]
            self.quantized += aged
        q = self.quantized
        return tuple(self._read(c[:, :, :q], s[:, :, :q], r) for c, s, r in zip(self._codes, self._scales, self._rest))

    def _read(self, codes: torch.Tensor, scale: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        """The dequantized history followed by the residual, written into one new tensor."""
        old = codes.shape[-2]
        out = rest.new_empty((*rest.shape[:-2], old + rest.shape[-2], rest.shape[-1]))
        self.quant.dequantize(codes, scale, self.dtype, out=out[:, :, :old])
        out[:, :, old:].copy_(rest)
        return out

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        if self.is_initialized:
            self._rest = [x[:, :, :0] for x in self._rest]
        self.quantized = 0
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        drop = min(-tokens_to_remove, self.length)
        if not self.is_initialized or not drop:
            return
        from_rest = min(drop, self._rest[0].shape[-2])
        self._rest = [x[:, :, : x.shape[-2] - from_rest] for x in self._rest]
        self.quantized -= drop - from_rest
        self.length -= drop

    def _set_batch(self, fn) -> None:
        if self.is_initialized:
            self._codes, self._scales, self._rest = ([fn(x) for x in group]
                                                     for group in (self._codes, self._scales, self._rest))

    def nbytes(self) -> int:
        """Bytes allocated: the code and scale buffers (with any unused capacity) and the residual."""
        if not self.is_initialized:
            return 0
        return sum(x.numel() * x.element_size() for x in (*self._codes, *self._scales, *self._rest))

    def used_bytes(self) -> int:
        """Bytes of the tokens held: what :meth:`KVShape.layer_bytes` accounts for."""
        if not self.is_initialized:
            return 0
        q = self.quantized
        held = (*(c[:, :, :q] for c in self._codes), *(s[:, :, :q] for s in self._scales), *self._rest)
        return sum(x.numel() * x.element_size() for x in held)


def shared_layers(
    plan: SharingPlan, shape: KVShape, max_cache_len: int | None = None, kv_quant: KVQuant | None = None
) -> list[Any]:
    """One empty cache layer per model layer: nothing for non-owners, a bounded, growing or
    quantized one for owners (sliding-window owners stay bounded and unquantized)."""
    if plan.num_layers != shape.num_layers:
        raise ValueError(f"plan {plan.spec!r} has {plan.num_layers} layers, the model {shape.num_layers}")
    layers: list[Any] = []
    for layer in range(plan.num_layers):
        if plan.source[layer] != layer:
            layers.append(DummyLayer())
            layers[-1].owner = layers[plan.source[layer]]  # what it answers for, where transformers asks
        elif shape.slides(layer):
            layers.append(DynamicSlidingWindowLayer(sliding_window=shape.sliding_window))
        elif kv_quant is not None:
            layers.append(QuantizedLayer(kv_quant, max_cache_len))
        else:
            layers.append(GrowingLayer(max_cache_len))
    return layers


class SharedKVCache(Cache):
    """A cache that holds KV for the plan's owner layers only.

    Args:
        plan: the sharing plan the model runs under.
        shape: the model's KV shape (``KVShape.from_config(model.config)``).
        max_cache_len: tokens to preallocate per sequence; the cache grows past it if needed.
        kv_quant: store the full-attention owners' KV quantized (``"int8"``, ``"int4"``, a
            :class:`~kvroute.kvquant.KVQuant`), or None (full precision).

    Example:
        >>> cache = SharedKVCache.for_model(model)            # doctest: +SKIP
        >>> out = model.generate(ids, cache=cache, max_new_tokens=8)  # doctest: +SKIP
    """

    def __init__(self, plan: SharingPlan, shape: KVShape, max_cache_len: int | None = None,
                 kv_quant: KVQuant | str | None = None) -> None:
        self.kv_quant = KVQuant.parse(kv_quant)
        super().__init__(layers=shared_layers(plan, shape, max_cache_len, self.kv_quant))
        self.plan = plan
        self.shape = shape

    @classmethod
    def for_model(cls, model: Any, plan: SharingPlan | str | None = None, max_cache_len: int | None = None,
                  kv_quant: KVQuant | str | None = None):
        """A cache for a routed model under its active plan (or ``plan``) and its KV quantization
        (:func:`kvroute.set_kv_quant`, or ``kv_quant``)."""
        from kvroute.hf.patch import get_router

        router = get_router(model)
        active = router.plan if plan is None else SharingPlan.for_model(plan, model.config)
        quant = router.kv_quant if kv_quant is None else kv_quant
        return cls(active, KVShape.from_config(model.config), max_cache_len, quant)

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (allocated, including unused capacity)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, (GrowingLayer, QuantizedLayer)):
                total += layer.nbytes()
            elif getattr(layer, "keys", None) is not None and layer.is_initialized:
                total += layer.keys.numel() * layer.keys.element_size() * 2
        return total

    def used_bytes(self) -> int:
        """Bytes of the tokens actually held."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, DummyLayer) or not layer.is_initialized:
                continue
            if isinstance(layer, QuantizedLayer):
                total += layer.used_bytes()
                continue
            keys = layer.keys
            total += keys.numel() * keys.element_size() * 2
        return total


def cache_nbytes(cache: Any) -> int:
    """Bytes held by a cache's tensors (``SharedKVCache.nbytes`` or the sum over a DynamicCache's layers)."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
