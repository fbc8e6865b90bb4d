"""Routed attention: one module replaces each supported family's attention.

It keeps the original's parameters under the same names (so checkpoints load and
save unchanged) and reads the KV of the layer its route names. A layer whose own
K/V nobody reads in this pass skips its K/V projections. A layer that reads
another layer's KV under a calibrated route applies that route's maps
(:class:`LayerMaps`, fitted by :mod:`kvroute.calibrate`) at run time; without them, the
pairwise maps of (layer, source) if it has some (:mod:`kvroute.pairs`).
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvroute.router import RoutingPass, Router


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as the supported families apply it. x: (B, H, T, D); cos, sin: (B, T, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)


def packed_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                  scaling: float, groups: int) -> torch.Tensor:
    """One query token's attention on the KV heads, each head's group of query heads as its rows.

    What transformers' ``sdpa`` does for a single query token when there is a mask (``pack_gqa``);
    without one it passes ``enable_gqa=True`` instead, and on CPU that kernel is several times
    slower for one query row in bf16 (about 1.4 ms against 0.18 ms per layer at 1,024 tokens on
    one thread; whole decode steps 1.3-1.4x faster, ``benchmarks/decode_attention.py``).

    Args:
        query: ``(B, H, 1, D)``, after RoPE; key, value: ``(B, H_kv, T, D)``.
        mask: None, or ``(B, 1, 1, >=T)`` boolean (True: attend) or additive.
    Returns:
        ``(B, 1, H, D)``, as the attention interfaces return it.
    """
    batch, heads, _, dim = query.shape
    if mask is not None:
        mask = mask[..., : key.shape[-2]]
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(batch, heads // groups, groups, dim), key, value, attn_mask=mask, scale=scaling
    )
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2)


class LayerMaps(nn.Module):
    """The calibration maps of one non-owner layer under one route.

    vLLM folds them into the layer's weights (the query map exactly into ``q_proj`` where
    there is no ``q_norm``; behind ``q_norm`` it multiplies at run time); here they are
    applied at run time so that switching plans never copies a weight:

    - ``query``: ``(H, D/2, 2)``, one complex scalar per query head and RoPE frequency
      pair (dims ``i`` and ``i + D/2``), multiplied into the query before RoPE (after
      ``q_norm``). It commutes with RoPE, so it maps the owner's keys towards the layer's own.
    - ``value``: ``(H, D, D)``, one matrix per query head applied to that head's attention
      output before ``o_proj`` (attention output is linear in V, so this maps the owner's
      values towards the layer's own); or ``(H_kv, D, D)``, one per KV head, shared by the
      query heads of its group.

    A plan's calibration holds them as non-persistent buffers: they follow ``.to()`` and
    copies of the model, and never enter its ``state_dict`` (a calibration is saved in a
    file of its own). Pairwise maps (:mod:`kvroute.pairs`) are ``trainable`` parameters,
    so that training updates them with the routes.
    """

    def __init__(self, query: torch.Tensor | None, value: torch.Tensor | None, trainable: bool = False) -> None:
        super().__init__()
        for name, tensor in (("query", query), ("value", value)):
            if trainable and tensor is not None:
                self.register_parameter(name, nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor, persistent=False)

    def map_query(self, query: torch.Tensor) -> torch.Tensor:
        """query: (B, H, T, D) before RoPE."""
        if self.query is None:
            return query
        a = self.query.to(query.dtype)
        re, im = a[..., 0].unsqueeze(1), a[..., 1].unsqueeze(1)  # (H, 1, D/2)
        q1, q2 = query.chunk(2, dim=-1)
        return torch.cat((re * q1 - im * q2, re * q2 + im * q1), dim=-1)

    def map_output(self, out: torch.Tensor) -> torch.Tensor:
        """out: (B, T, H, D), each head's attention output."""
        if self.value is None:
            return out
        value = self.value.to(out.dtype)
        if value.shape[0] != out.shape[2]:  # one map per KV head: shared by its query heads
            value = value.repeat_interleave(out.shape[2] // value.shape[0], dim=0)
        return torch.einsum("bthd,hde->bthe", out, value)


class RoutedAttention(nn.Module):
    """Attention of one decoder layer that may read an earlier layer's KV.

    Args:
        original: the family's attention module; its projections (and q/k norms) are adopted.
        router: the model's router, shared by all routed layers.
    """

    def __init__(self, original: nn.Module, router: Router) -> None:
        super().__init__()
        self.config = original.config
        self.layer_idx: int = original.layer_idx
        self.head_dim: int = original.head_dim
        self.num_key_value_groups: int = original.num_key_value_groups
        self.scaling: float = original.scaling
        self.attention_dropout: float = original.attention_dropout
        self.is_causal: bool = original.is_causal
        if hasattr(original, "sliding_window"):
            self.sliding_window = original.sliding_window
        else:  # Mistral reads it from the config
            self.sliding_window = getattr(original.config, "sliding_window", None)
        self.softcap = getattr(original, "attn_logit_softcapping", None)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            original.q_proj, original.k_proj, original.v_proj, original.o_proj,
        )
        self.q_norm = getattr(original, "q_norm", None)
        self.k_norm = getattr(original, "k_norm", None)
        self._eager: Callable = sys.modules[type(original).__module__].eager_attention_forward
        self.calibration = nn.ModuleDict()  # route_key(route) -> LayerMaps of this layer
        self.pairs = nn.ModuleDict()  # str(source layer) -> trainable LayerMaps for every route reading it
        object.__setattr__(self, "router", router)  # shared, not a submodule

    def _project(self, proj: nn.Module, norm: nn.Module | None, hidden: torch.Tensor) -> torch.Tensor:
        out = proj(hidden).view(*hidden.shape[:-1], -1, self.head_dim)  # (B, T, H, D)
        if norm is not None:
            out = norm(out)
        return out.transpose(1, 2)  # (B, H, T, D)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        routing: RoutingPass | None = self.router.current
        if routing is None:
            raise RuntimeError(
                "kvroute: a routed attention layer was called outside a routed forward pass; "
                "call the model (or its decoder), not the layer"
            )
        cache = cache if cache is not None else past_key_values
        cos, sin = position_embeddings
        idx = self.layer_idx
        source = routing.route[idx]
        if routing.key in self.calibration:  # the plan's own calibration comes first
            maps = self.calibration[routing.key]
        elif source != idx and str(source) in self.pairs:
            maps = self.pairs[str(source)]
        else:
            maps = None
        query = self._project(self.q_proj, self.q_norm, hidden_states)  # (B, H, T, D)
        if maps is not None:
            query = maps.map_query(query)
        query = apply_rope(query, cos, sin)
        if idx in routing.producers:
            key = apply_rope(self._project(self.k_proj, self.k_norm, hidden_states), cos, sin)
            value = self._project(self.v_proj, None, hidden_states)
            if cache is not None:
                key, value = cache.update(key, value, idx, kwargs=kwargs)
            routing.kv[idx] = (key, value)
        key, value = routing.kv[source]

        if self._packed_decode(query, attention_mask):
            attn_output, attn_weights = packed_decode(query, key, value, attention_mask, self.scaling,
                                                      self.num_key_value_groups), None
        else:
            attn_output, attn_weights = self._attend(query, key, value, attention_mask, **kwargs)
        if maps is not None:
            attn_output = maps.map_output(attn_output)  # (B, T, H, D)
        attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.o_proj(attn_output), attn_weights

    def _packed_decode(self, query: torch.Tensor, mask: torch.Tensor | None) -> bool:
        """Whether this step is a CPU ``sdpa`` decode of one token with grouped KV heads (see
        :func:`packed_decode`); GPUs keep transformers' own path."""
        return (query.shape[2] == 1 and query.device.type == "cpu" and self.num_key_value_groups > 1
                and self.config._attn_implementation == "sdpa" and self.softcap is None
                and not (self.training and self.attention_dropout > 0)
                and (mask is None or (mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1)))

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's configured attention implementation (transformers' interface)."""
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._eager)
        extra = {"softcap": self.softcap} if self.softcap is not None else {}
        return interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **extra,
            **kwargs,
        )
