"""vLLM's Gemma3 (text) with depth-wise KV sharing under a kvroute plan.

Sliding and global layers share only within their type, as in the HF path; a calibration's
query maps run after ``q_norm``, its value maps fold into ``o_proj``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import GemmaRMSNorm
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.models import gemma3 as vllm_gemma3
from vllm.model_executor.models.gemma3 import Gemma3DecoderLayer, Gemma3ForCausalLM, Gemma3MLP
from vllm.model_executor.models.utils import extract_layer_index

from kvroute.plan import SharingPlan
from kvroute.vllm.config import resolve_plan
from kvroute.vllm.layers import (
    SharedKVAttention,
    log_plan,
    owner_attention_name,
    run_time_query_map,
    served_calibration,
)
from kvroute.vllm.weights import CalibrationFold, route_weights


class SharedKVGemma3DecoderLayer(Gemma3DecoderLayer):
    """A Gemma3 decoder layer whose attention keeps no KV; ``forward`` is vLLM's.

    The query goes through Gemma's ``q_norm`` (so a calibration query map runs after it),
    the scale is ``query_pre_attn_scalar ** -0.5``, and RoPE and the sliding window are
    those of the layer's own type, which its owner shares (plans share only within a type).
    """

    def __init__(
        self, config: Any, cache_config: Any = None, quant_config: QuantizationConfig | None = None,
        prefix: str = "", *, owner: int, calibration: CalibrationFold | None = None,
    ) -> None:
        nn.Module.__init__(self)
        if not getattr(config, "is_causal", True):
            raise ValueError("kvroute: KV sharing needs causal decoder attention (config is_causal=False)")
        layer = extract_layer_index(prefix)
        layer_type = config.layer_types[layer]
        head_dim = config.head_dim
        self.hidden_size = hidden = config.hidden_size
        self.self_attn = SharedKVAttention(
            hidden_size=hidden,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            rotary_emb=get_rope(head_dim, max_position=config.max_position_embeddings,
                                rope_parameters=config.rope_parameters[layer_type], is_neox_style=True),
            target=owner_attention_name(f"{prefix}.self_attn", owner),
            q_bias=config.attention_bias,
            o_bias=config.attention_bias,
            q_norm=GemmaRMSNorm(head_dim, eps=config.rms_norm_eps),
            scaling=config.query_pre_attn_scalar**-0.5,
            query_map=run_time_query_map(calibration, layer, q_norm=True),
            sliding_window=config.sliding_window if layer_type == "sliding_attention" else None,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.self_attn",
        )
        self.mlp = Gemma3MLP(hidden_size=hidden, intermediate_size=config.intermediate_size,
                             hidden_activation=config.hidden_activation, quant_config=quant_config,
                             prefix=f"{prefix}.mlp")
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, GemmaRMSNorm(hidden, eps=config.rms_norm_eps))


@contextlib.contextmanager
def _gemma3_layers(plan: SharingPlan, calibration: CalibrationFold | None) -> Iterator[None]:
    """Build vLLM's Gemma3 model with routed layers.

    vLLM's ``Gemma3Model`` names its layer class inside a lambda, with no parameter to change it,
    so for the duration of the build that name resolves to a factory that follows ``plan``.
    """
    stock = vllm_gemma3.Gemma3DecoderLayer

    def build(config: Any, cache_config: Any = None, quant_config: Any = None, prefix: str = "") -> nn.Module:
        layer = extract_layer_index(prefix)
        owner = plan.source[layer]
        if owner == layer:
            return stock(config, cache_config, quant_config, prefix=prefix)
        return SharedKVGemma3DecoderLayer(config, cache_config, quant_config, prefix, owner=owner,
                                          calibration=calibration)

    vllm_gemma3.Gemma3DecoderLayer = build
    try:
        yield
    finally:
        vllm_gemma3.Gemma3DecoderLayer = stock


class KVRouteGemma3ForCausalLM(Gemma3ForCausalLM):
    """vLLM's Gemma3 (text) with depth-wise KV sharing under a kvroute plan.

    Sliding and global layers share only within their type, as in the HF path; a calibration's
    query maps run after ``q_norm``, its value maps fold into ``o_proj``.
    """

    family = "Gemma3"

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config.get_text_config()
        plan = resolve_plan(config)
        calibration = served_calibration(vllm_config, config, plan)
        with _gemma3_layers(plan, calibration):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.plan = plan
        self.calibration = calibration
        log_plan(plan, self.family, calibration, query_at_run_time=True)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if self.calibration is not None:
            weights = self.calibration.fold(weights, queries=False)
        return super().load_weights(route_weights(weights, self.plan))
