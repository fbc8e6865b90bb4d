"""vLLM's Qwen2 and Qwen3 with depth-wise KV sharing under a kvroute plan.

Layers with a ``q_norm`` (Qwen3, Qwen2 with ``qk_norm``) apply a calibration's query maps
at run time, after the norm; the others have them folded into the query projection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2MLP, Qwen2Model
from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM
from vllm.model_executor.models.utils import PPMissingLayer, extract_layer_index, maybe_prefix
from vllm.transformers_utils.config import set_default_rope_theta

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


class SharedKVQwenDecoderLayer(Qwen2DecoderLayer):
    """A Qwen2 or Qwen3 decoder layer whose attention keeps no KV.

    Built like vLLM's layer (same MLP and norms); ``forward`` is Qwen2's, which
    Qwen3's layer repeats unchanged.
    """

    def __init__(
        self, *, config: Any, cache_config: Any, quant_config: QuantizationConfig | None, prefix: str,
        owner: int, qwen3: bool, calibration: CalibrationFold | None = None,
    ) -> None:
        nn.Module.__init__(self)
        if getattr(config, "dual_chunk_attention_config", None):
            raise ValueError("kvroute does not serve Qwen models with dual_chunk_attention_config")
        if not getattr(config, "is_causal", True):
            raise ValueError("kvroute: KV sharing needs causal decoder attention (config is_causal=False)")
        set_default_rope_theta(config, default_theta=1000000)
        self.hidden_size = hidden = config.hidden_size
        heads = config.num_attention_heads
        if qwen3:  # vLLM's Qwen3Attention: head_dim from the config, optional bias, q/k norms
            head_dim = getattr(config, "head_dim", None) or hidden // heads
            q_bias, q_norm_eps = getattr(config, "attention_bias", False), config.rms_norm_eps
        else:  # vLLM's Qwen2Attention: q/k/v biases, q/k norms only with config.qk_norm
            head_dim = hidden // heads
            q_bias = True
            q_norm_eps = config.rms_norm_eps if getattr(config, "qk_norm", False) else None
        self.self_attn = SharedKVAttention(
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            rotary_emb=get_rope(
                head_dim, max_position=config.max_position_embeddings, rope_parameters=config.rope_parameters
            ),
            target=owner_attention_name(f"{prefix}.self_attn", owner),
            q_bias=q_bias,
            q_norm_eps=q_norm_eps,
            query_map=run_time_query_map(calibration, extract_layer_index(prefix), q_norm_eps is not None),
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.self_attn",
        )
        self.mlp = Qwen2MLP(
            hidden_size=hidden,
            intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act,
            quant_config=quant_config,
            prefix=f"{prefix}.mlp",
        )
        self.input_layernorm = RMSNorm(hidden, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps=config.rms_norm_eps)


def qwen_layer_factory(
    stock: type[nn.Module], plan: SharingPlan, qwen3: bool, calibration: CalibrationFold | None = None
) -> Callable[..., nn.Module]:
    """A ``decoder_layer_type`` for vLLM's ``Qwen2Model`` that follows ``plan``.

    Layers with a ``q_norm`` take their calibration query map to apply at run time.
    """

    def build(*, config: Any, cache_config: Any = None, quant_config: Any = None, prefix: str = "",
              **kwargs: Any) -> nn.Module:
        layer = extract_layer_index(prefix)
        owner = plan.source[layer]
        if owner == layer:
            return stock(config=config, cache_config=cache_config, quant_config=quant_config, prefix=prefix, **kwargs)
        return SharedKVQwenDecoderLayer(
            config=config, cache_config=cache_config, quant_config=quant_config, prefix=prefix,
            owner=owner, qwen3=qwen3, calibration=calibration,
        )

    return build


class _KVRouteQwen:
    """Shared construction of the routed Qwen2 and Qwen3 causal LMs.

    vLLM's Qwen causal LMs build their decoder with fixed layer classes, so this
    repeats their (short) ``__init__`` with a routed ``decoder_layer_type``.
    """

    family = "Qwen"
    stock_layer: type[nn.Module] = Qwen2DecoderLayer
    qwen3 = False

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config.get_text_config()
        plan = resolve_plan(config)
        calibration = served_calibration(vllm_config, config, plan)
        self.config = config
        self.vllm_config = vllm_config
        self.quant_config = vllm_config.quant_config
        self.plan = plan
        self.calibration = calibration
        self.model = Qwen2Model(
            vllm_config=vllm_config,
            prefix=maybe_prefix(prefix, "model"),
            decoder_layer_type=qwen_layer_factory(self.stock_layer, plan, self.qwen3, calibration),
        )
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(
                config.vocab_size, config.hidden_size, quant_config=self.quant_config,
                prefix=maybe_prefix(prefix, "lm_head"),
            )
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        log_plan(plan, self.family, calibration, self._q_norm)

    @property
    def _q_norm(self) -> bool:
        """Whether a layer that keeps no KV normalises its queries (then query maps run, not fold)."""
        return self.qwen3 or bool(getattr(self.config, "qk_norm", False))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if self.calibration is not None:
            weights = self.calibration.fold(weights, queries=not self._q_norm)
        return super().load_weights(route_weights(weights, self.plan))  # type: ignore[misc]


class KVRouteQwen2ForCausalLM(_KVRouteQwen, Qwen2ForCausalLM):
    """vLLM's Qwen2 with depth-wise KV sharing under a kvroute plan."""

    family = "Qwen2"
    stock_layer = Qwen2DecoderLayer
    qwen3 = False


class KVRouteQwen3ForCausalLM(_KVRouteQwen, Qwen3ForCausalLM):
    """vLLM's Qwen3 with depth-wise KV sharing under a kvroute plan."""

    family = "Qwen3"
    stock_layer = Qwen3DecoderLayer
    qwen3 = True
