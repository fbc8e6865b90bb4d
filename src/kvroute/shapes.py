"""Named model shapes: configs of well-known models, so memory figures and benchmarks need no weights.

``plan show`` and ``plan budget`` only need a config; ``bench`` builds a model with
random weights from one. A MODEL argument is a named shape, a checkpoint folder
(only its ``config.json`` is read) or a ``.gguf`` file.

- ``smollm2-135m``: SmolLM2-135M (Llama, 30 layers, 9 heads, 3 KV heads, head_dim 64);
- ``qwen3-8b``: Qwen3-8B (36 layers, 32 heads, 8 KV heads, head_dim 128): the paper's efficiency model;
- ``qwen3-8b-mini``: Qwen3-8B's KV geometry (36 layers x 8 KV heads x 128, so the same KV
  bytes per token) on a narrow body (hidden 512, 8 query heads, intermediate 1536,
  vocab 32000, ~150M parameters) that runs on a CPU;
- ``llama-3.1-8b``: Llama-3.1-8B (32 layers, 32 heads, 8 KV heads, head_dim 128).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        model_type="llama", num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152,
        max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    ),
    "qwen3-8b": dict(
        model_type="qwen3", num_hidden_layers=36, hidden_size=4096, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936,
        max_position_embeddings=40960, tie_word_embeddings=False, rms_norm_eps=1e-6,
        rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"},
    ),
    "qwen3-8b-mini": dict(
        model_type="qwen3", num_hidden_layers=36, hidden_size=512, num_attention_heads=8,
        num_key_value_heads=8, head_dim=128, intermediate_size=1536, vocab_size=32000,
        max_position_embeddings=40960, tie_word_embeddings=True, rms_norm_eps=1e-6,
        rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"},
    ),
    "llama-3.1-8b": dict(
        model_type="llama", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256,
        max_position_embeddings=131072, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 500000.0, "rope_type": "default"},
    ),
}


def is_shape(name: str | os.PathLike) -> bool:
    """Whether ``name`` is a named shape (and not a path)."""
    return str(name).lower() in SHAPES and not Path(str(name)).exists()


def shape_config(name: str) -> Any:
    """The transformers config of a named shape."""
    from transformers import AutoConfig

    key = name.lower()
    if key not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; named shapes: {', '.join(SHAPES)}")
    kwargs = dict(SHAPES[key])
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def resolve_config(model: str | os.PathLike) -> Any:
    """The config of a named shape, a checkpoint folder or a ``.gguf`` file, without loading weights.

    Raises:
        FileNotFoundError: a path that does not exist (or a folder without config.json).
        ValueError: a name that is neither a shape nor a path.
    """
    from transformers import AutoConfig

    text = str(model)
    if is_shape(text):
        return shape_config(text)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json")
        return AutoConfig.from_pretrained(str(path))
    raise ValueError(
        f"{text!r} is neither a named shape ({', '.join(SHAPES)}) nor a checkpoint folder or .gguf file"
    )


def random_model(model: str | os.PathLike | Any, dtype: Any = "float32", seed: int = 0) -> Any:
    """A model with random weights for a named shape, a checkpoint's config, or a config object."""
    import torch
    from transformers import AutoModelForCausalLM

    from kvroute.models import resolve_dtype

    config = resolve_config(model) if isinstance(model, (str, os.PathLike)) else model
    torch.manual_seed(seed)
    net = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype), attn_implementation="sdpa")
    return net.eval()
