"""vLLM's Llama (and Mistral, through Llama's code) with depth-wise KV sharing under a kvroute plan.

Llama has no ``q_norm``: a calibration's query maps fold into the query projection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType

from kvroute.plan import SharingPlan
from kvroute.vllm.config import resolve_plan
from kvroute.vllm.layers import SharedKVAttention, log_plan, owner_attention_name, served_calibration
from kvroute.vllm.weights import route_weights


def _sliding_window(config: Any, layer: int) -> int | None:
    types = getattr(config, "layer_types", None)
    if types and types[layer] == "sliding_attention":
        return config.sliding_window
    return None


def llama_attention_factory(plan: SharingPlan) -> Callable[..., nn.Module]:
    """An ``attn_layer_type`` for vLLM's ``LlamaDecoderLayer`` that follows ``plan``.

    Llama has no ``q_norm``: a calibration's query maps fold into the query projection.
    """

    def build(**kwargs: Any) -> nn.Module:
        prefix = kwargs["prefix"]
        layer = extract_layer_index(prefix)
        owner = plan.source[layer]
        if owner == layer:
            return LlamaAttention(**kwargs)
        if kwargs.get("attn_type", AttentionType.DECODER) != AttentionType.DECODER:
            raise ValueError("kvroute: KV sharing needs causal decoder attention (config is_causal=False)")
        config = kwargs["config"]
        hidden_size, num_heads = kwargs["hidden_size"], kwargs["num_heads"]
        head_dim = getattr(config, "head_dim", None) or hidden_size // num_heads
        rotary = get_rope(
            head_dim,
            max_position=kwargs.get("max_position_embeddings", 8192),
            rope_parameters=getattr(config, "rope_parameters", None),
            is_neox_style=True,
        )
        return SharedKVAttention(
            hidden_size=hidden_size,
            num_heads=num_heads,
            num_kv_heads=kwargs["num_kv_heads"],
            head_dim=head_dim,
            rotary_emb=rotary,
            target=owner_attention_name(prefix, owner),
            q_bias=kwargs.get("bias", False),
            o_bias=kwargs.get("bias_o_proj", False),
            sliding_window=_sliding_window(config, layer),
            cache_config=kwargs.get("cache_config"),
            quant_config=kwargs.get("quant_config"),
            prefix=prefix,
        )

    return build


class KVRouteLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's Llama with depth-wise KV sharing under a kvroute plan."""

    family = "Llama"

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        self._check_config(config)
        plan = resolve_plan(config)
        calibration = served_calibration(vllm_config, config, plan)
        layer_type = partial(LlamaDecoderLayer, attn_layer_type=llama_attention_factory(plan))
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
        self.plan = plan
        self.calibration = calibration
        log_plan(plan, self.family, calibration, query_at_run_time=False)

    @staticmethod
    def _check_config(config: Any) -> None:
        return None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if self.calibration is not None:
            weights = self.calibration.fold(weights, queries=True)
        return super().load_weights(route_weights(weights, self.plan))


class KVRouteMistralForCausalLM(KVRouteLlamaForCausalLM):
    """HF Mistral through vLLM's Llama code (as vLLM itself serves ``MistralModel``)."""

    family = "Mistral"

    @staticmethod
    def _check_config(config: Any) -> None:
        for key in ("llama_4_scaling", "ada_rms_norm_t_cond"):
            if getattr(config, key, None):
                raise ValueError(f"kvroute does not serve Mistral variants with {key!r} set")
