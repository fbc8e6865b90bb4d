"""Tiny models of every supported family, built from configs (no downloads); textkit.py adds the text,
tokenizers and checkpoint folders around them. Also a model built to be exactly calibratable, with the
token ids, logits and fast settings the calibration and pairwise-map tests share."""

from __future__ import annotations

import os

import pytest
import torch

import kvroute
from kvroute.calibrate import CalibrationConfig

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]


def tiny_config(family: str, layers: int = 4, attn: str = "sdpa", vocab: int = 97):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    if family == "llama":
        config = LlamaConfig(**common)
    elif family == "mistral":
        config = MistralConfig(**common, sliding_window=None)
    elif family == "qwen2":
        config = Qwen2Config(**common)
    elif family == "qwen3":
        config = Qwen3Config(**common, head_dim=8)
    elif family == "gemma3_text":
        config = Gemma3TextConfig(
            **common, head_dim=8, sliding_window=8, query_pre_attn_scalar=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"] * (layers // 3)
            + ["sliding_attention"] * (layers % 3),
        )
    else:
        raise ValueError(family)
    config._attn_implementation = attn
    return config


def tiny_model(family: str = "llama", layers: int = 4, seed: int = 0, attn: str = "sdpa", vocab: int = 97):
    """A random tiny causal LM in eval mode (``vocab``: see textkit.py's tokenizers)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers, attn, vocab), attn_implementation=attn)
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def record_routes(model) -> list[tuple[int, ...]]:
    """From now on, the route of every forward pass of a routed model, read from the pass itself
    (a decoder pre-hook that runs after kvroute's, on whichever copy of the model runs)."""
    from kvroute.hf.patch import ROUTER_ATTR, _decoder

    routes: list[tuple[int, ...]] = []
    _decoder(model).register_forward_pre_hook(lambda m, args: routes.append(getattr(m, ROUTER_ATTR).current.route))
    return routes


# ----------------------------------------------------------------------------- calibration
#: calibration settings small enough for the tiny models
FAST = CalibrationConfig(tokens=1024, chunk_tokens=32, val_fraction=0.25, batch_size=8, precision="fp32")


def chunks(n: int = 24, t: int = 32, seed: int = 0) -> torch.Tensor:
    """``n`` random rows of ``t`` token ids (3..96: no special tokens)."""
    return torch.randint(3, 97, (n, t), generator=torch.Generator().manual_seed(seed))


def logits(model, ids: torch.Tensor, plan: str) -> torch.Tensor:
    """The model's logits under ``plan`` (set in place), without a cache."""
    kvroute.set_plan(model, plan)
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def calibratable(family: str) -> torch.nn.Module:
    """every:2 is exactly calibratable: odd layers see the same input as the even layer before them
    (even layers add nothing to the residual), read the same keys, and their values are a linear
    image (per head) of their owner's."""
    model = tiny_model(family, layers=4, seed=1)
    layers = model.model.layers
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for owner in (0, 2):
            a, b = layers[owner], layers[owner + 1]
            a.self_attn.o_proj.weight.zero_()
            a.mlp.down_proj.weight.zero_()
            b.input_layernorm.weight.copy_(a.input_layernorm.weight)
            b.self_attn.k_proj.weight.copy_(a.self_attn.k_proj.weight)
            if getattr(b.self_attn, "k_norm", None) is not None:
                b.self_attn.k_norm.weight.copy_(a.self_attn.k_norm.weight)
            d = a.self_attn.head_dim
            w = a.self_attn.v_proj.weight.view(-1, d, a.self_attn.v_proj.weight.shape[-1])  # (H_kv, D, hidden)
            m = torch.randn(w.shape[0], d, d, generator=g) / d**0.5
            b.self_attn.v_proj.weight.copy_(torch.einsum("hdi,hde->hei", w, m).reshape_as(b.self_attn.v_proj.weight))
    return kvroute.apply(model)
