"""Named model shapes: one table of configs, for memory figures, benchmarks and pre-training.

:data:`SHAPES` maps a name to a model type and its config fields, so a model needs no
weights to be sized, benchmarked or pre-trained. A MODEL argument of ``plan show``,
``plan budget`` and ``bench`` is a named shape, a checkpoint folder (only its
``config.json`` is read) or a ``.gguf`` file; ``bench`` builds a model with random weights
from the config.

Well-known models (with their vocabulary):

- ``smollm2-135m``: SmolLM2-135M (Llama, 30 layers, 9 heads, 3 KV heads, head_dim 64);
- ``qwen3-8b``: Qwen3-8B (36 layers, 32 heads, 8 KV heads, head_dim 128): the paper's efficiency model;
- ``qwen3-8b-mini``: Qwen3-8B's KV geometry (36 layers x 8 KV heads x 128, so the same KV
  bytes per token) on a narrow body (hidden 512, 8 query heads, intermediate 1536,
  vocab 32000, ~150M parameters) that runs on a CPU;
- ``llama-3.1-8b``: Llama-3.1-8B (32 layers, 32 heads, 8 KV heads, head_dim 128).

Pre-training presets (:data:`PRESETS`, ``TrainConfig(preset=...)``, ``kvroute train
--preset``): Qwen3-style shapes from ``tiny`` (tests, CPU) up to the paper's
``qwen3-1.7b`` (28 layers). They are the entries *without a vocabulary*: pre-training
takes it from the tokenizer the run uses (:func:`preset_config`); as a plain shape
(``plan show tiny``) a preset has the model type's default vocabulary, which KV figures
do not depend on. The paper's baseline is a *shallower* standard model with the same
cache, so every preset takes a ``layers`` override.

Example:
    >>> cfg = preset_config("tiny", vocab_size=100)
    >>> cfg.model_type, cfg.num_hidden_layers
    ('qwen3', 4)
    >>> sorted(PRESETS) == sorted(n for n, f in SHAPES.items() if "vocab_size" not in f)
    True
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: what every pre-training preset shares (a definition of one's own gets it too)
_PRETRAIN = dict(model_type="qwen3", tie_word_embeddings=True,
                 rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"})

#: name -> ``model_type`` and config fields. The entries without ``vocab_size`` are the pre-training presets.
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
    # pre-training presets: no vocabulary (the tokenizer's)
    "tiny": dict(**_PRETRAIN, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024),
    "mini": dict(**_PRETRAIN, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048),
    "small": dict(**_PRETRAIN, hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048),
    "qwen3-0.6b": dict(**_PRETRAIN, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=40960),
    "qwen3-1.7b": dict(**_PRETRAIN, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=40960),
}

#: the pre-training presets: the :data:`SHAPES` entries without a vocabulary (same objects, no copy)
PRESETS: dict[str, dict[str, Any]] = {name: f for name, f in SHAPES.items() if "vocab_size" not in f}


def is_shape(name: str | os.PathLike) -> bool:
    """Whether ``name`` is a named shape (and not a path)."""
    return str(name).lower() in SHAPES and not Path(str(name)).exists()


def _config(fields: Mapping[str, Any], **overrides: Any) -> Any:
    from transformers import AutoConfig

    kwargs = {**copy.deepcopy(dict(fields)), **overrides}  # the table's nested dicts stay untouched
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def shape_config(name: str) -> Any:
    """The transformers config of a named shape (a preset's vocabulary: its model type's default)."""
    key = name.lower()
    if key not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; named shapes: {', '.join(SHAPES)}")
    return _config(SHAPES[key])


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


#: the fields a preset definition must give (the rest: Qwen3 with tied embeddings, or what it says)
PRESET_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings")


def check_preset_fields(fields: Mapping[str, Any]) -> None:
    """Check a preset definition (a dict of config fields) before any model is built.

    Raises:
        ValueError: naming the missing fields.
    """
    missing = [k for k in PRESET_FIELDS if k not in fields]
    if missing:
        raise ValueError(f"--preset: a preset definition needs {', '.join(missing)}")


def preset_config(
    name: str | Mapping[str, Any],
    vocab_size: int,
    layers: int | None = None,
    max_positions: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> Any:
    """A fresh config to pre-train a preset from scratch, with the tokenizer's vocabulary.

    Args:
        name: one of :data:`PRESETS`, or a preset definition of its own (a dict of config fields
            like the table's entries; ``model_type`` ``qwen3``, tied embeddings and Qwen3's RoPE
            unless it says otherwise; the table is left as it is).
        vocab_size: the tokenizer's vocabulary size.
        layers: override the depth (the paper's shallower baselines).
        max_positions: raise the maximum sequence length, if needed.
        bos_token_id, eos_token_id, pad_token_id: the tokenizer's special tokens.

    Returns:
        A ``transformers`` config (``Qwen3Config`` for every preset of the table) with tied embeddings.

    Raises:
        ValueError: for an unknown preset or a non-positive depth.
    """
    if isinstance(name, Mapping):
        check_preset_fields(name)
    elif name not in PRESETS:
        raise ValueError(f"--preset: unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    if layers is not None and layers <= 0:
        raise ValueError(f"--layers must be a positive integer, got {layers}")
    fields = {**_PRETRAIN, **(name if isinstance(name, Mapping) else PRESETS[name])}
    if layers is not None:
        fields["num_hidden_layers"] = layers
    if max_positions is not None:
        fields["max_position_embeddings"] = max(fields["max_position_embeddings"], max_positions)
    return _config(fields, vocab_size=vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                   pad_token_id=pad_token_id)


def parameter_count(config: Any) -> int:
    """Approximate parameter count of a preset config (tied embeddings)."""
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    d, q, kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    attn = h * d * (q + 2 * kv) + q * d * h + 4 * d
    return config.vocab_size * h + n * (attn + 3 * h * i + 2 * h) + h
