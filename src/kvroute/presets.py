"""Qwen3-style model shapes for pre-training from scratch.

The paper pre-trains a Qwen3-1.7B-style model (28 layers); its baseline is a
*shallower* standard model with the same cache, so every preset takes a
``layers`` override. The vocabulary comes from the tokenizer the run uses.

Example:
    >>> cfg = preset_config("tiny", vocab_size=100)
    >>> cfg.model_type, cfg.num_hidden_layers
    ('qwen3', 4)
"""

from __future__ import annotations

from typing import Any

#: name -> Qwen3Config fields. Shapes from tiny (tests, CPU) up to the paper's 1.7B.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024),
    "mini": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048),
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=40960),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=40960),
}


def preset_config(
    name: str,
    vocab_size: int,
    layers: int | None = None,
    max_positions: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
):
    """A fresh ``Qwen3Config`` for a preset.

    Args:
        name: one of :data:`PRESETS`.
        vocab_size: the tokenizer's vocabulary size.
        layers: override the depth (the paper's shallower baselines).
        max_positions: raise the maximum sequence length, if needed.
        bos_token_id, eos_token_id, pad_token_id: the tokenizer's special tokens.

    Returns:
        A ``transformers.Qwen3Config`` with tied embeddings.

    Raises:
        ValueError: for an unknown preset or a non-positive depth.
    """
    from transformers import Qwen3Config

    if name not in PRESETS:
        raise ValueError(f"--preset: unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    if layers is not None and layers <= 0:
        raise ValueError(f"--layers must be a positive integer, got {layers}")
    fields = dict(PRESETS[name])
    if layers is not None:
        fields["num_hidden_layers"] = layers
    if max_positions is not None:
        fields["max_position_embeddings"] = max(fields["max_position_embeddings"], max_positions)
    return Qwen3Config(
        **fields, vocab_size=vocab_size, tie_word_embeddings=True, rope_theta=1_000_000.0,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )


def parameter_count(config: Any) -> int:
    """Approximate parameter count of a preset config (tied embeddings)."""
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    d, q, kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    attn = h * d * (q + 2 * kv) + q * d * h + 4 * d
    return config.vocab_size * h + n * (attn + 3 * h * i + 2 * h) + h
