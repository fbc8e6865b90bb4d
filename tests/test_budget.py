"""budget.py and `kvroute plan show / budget`: memory figures from a config alone, budgets to owners, clear errors."""

from __future__ import annotations

import pytest
from conftest import tiny_config

from kvroute.budget import max_owners_for_memory, owners_for_budget, parse_bytes
from kvroute.cli import main
from kvroute.plan import KVShape
from kvroute.shapes import SHAPES, resolve_config

SMOL = KVShape(num_layers=30, kv_heads=3, head_dim=64)
QWEN8B = KVShape(num_layers=36, kv_heads=8, head_dim=128)


def test_named_shapes_match_the_real_models():
    assert KVShape.from_config(resolve_config("smollm2-135m")) == SMOL
    assert KVShape.from_config(resolve_config("qwen3-8b")) == QWEN8B
    assert KVShape.from_config(resolve_config("qwen3-8b-mini")) == QWEN8B  # same KV bytes per token
    assert set(SHAPES) >= {"smollm2-135m", "qwen3-8b", "qwen3-8b-mini"}
    with pytest.raises(ValueError, match="neither a named shape"):
        resolve_config("no-such-model")


def test_plan_show_named_shape(capsys):
    assert main(["plan", "show", "smollm2-135m", "--plan", "every:4", "--batch", "8", "--context", "2048"]) == 0
    out = capsys.readouterr().out
    assert "owners: 0,4,8,12,16,20,24,28" in out
    assert "    5       4  reads 4" in out
    # 30 layers x 2 x 3 heads x 64 x 2 bytes = 22.5 KiB per token; 8 owners = 6 KiB
    assert "KV bytes per token (bf16): 6.00 KiB vs full 22.50 KiB" in out
    assert "batch 8 x 2048 tokens: 96.00 MiB vs full 360.00 MiB" in out


def test_plan_show_reads_only_the_config(tmp_path, capsys):
    tiny_config("gemma3_text", layers=6).save_pretrained(tmp_path)  # config.json, no weights
    assert main(["plan", "show", str(tmp_path), "--plan", "every:4", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "owners: 0,2,4" in out and "(sliding_attention)" in out  # the first full layer (2) always owns


def test_plan_budget(capsys):
    args = ["plan", "budget", "qwen3-8b", "--memory", "6GiB", "--batch", "8", "--context", "16384"]
    assert main(args) == 0
    out = capsys.readouterr().out
    # one layer: 2 x 8 x 128 x 2 bytes x 8 x 16384 tokens = 512 MiB, so 12 of 36 layers
    assert "allows 12 of 36 owner layers" in out and "every:3" in out


def test_plan_budget_too_small_and_full(capsys):
    assert main(["plan", "budget", "qwen3-8b", "--memory", "100MiB", "--batch", "8", "--context", "16384"]) == 1
    assert "does not fit" in capsys.readouterr().out
    assert main(["plan", "budget", "smollm2-135m", "--memory", "1GiB", "--context", "2048"]) == 0
    assert "the full cache fits" in capsys.readouterr().out


def test_plan_cli_errors(capsys):
    assert main(["plan", "show", "smollm2-135m", "--plan", "every:0"]) == 2
    assert "K must be a positive integer" in capsys.readouterr().err
    assert main(["plan", "budget", "smollm2-135m", "--memory", "lots"]) == 2
    assert "cannot read memory size" in capsys.readouterr().err
    assert main(["plan", "show", "/no/such/folder", "--plan", "full"]) == 2


@pytest.mark.parametrize("text, expected", [("6GiB", 6 * 2**30), ("512MB", 512 * 10**6), ("1e9B", 10**9),
                                            ("2 KiB", 2048), ("3G", 3 * 2**30)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("budget, owners", [("0.25", 8), (0.5, 15), ("1.0", 30), ("8", 8), ("30", 30), ("1", 1)])
def test_owners_for_budget(budget, owners):
    assert owners_for_budget(budget, SMOL) == owners


def test_memory_budget_to_owners():
    # 22.5 KiB/token full in bf16; 0.75 KiB per layer-token; 1 x 4096 tokens = 3 MiB per layer
    assert owners_for_budget("30MiB", SMOL, batch=1, context=4096) == 10
    assert max_owners_for_memory(QWEN8B, 6 * 2**30, batch=8, context=16384) == 12
    assert max_owners_for_memory(QWEN8B, 2**20, batch=8, context=16384) == 0


@pytest.mark.parametrize("budget, kwargs, match", [
    ("31", {}, "above full"),
    ("1.5", {}, "at most 1.0"),
    ("0", {}, "below the sparsest"),
    ("0.01", {}, "below 1 owner layer"),
    ("-0.5", {}, "must be positive"),
    ("4MiB", {}, "needs a context"),
    ("1GiB", {"context": 4096}, "full cache .* already fits"),
    ("1MiB", {"context": 4096}, "even the sparsest plan"),
    ("many", {}, "cannot read budget"),
])
def test_bad_budgets(budget, kwargs, match):
    with pytest.raises(ValueError, match=match):
        owners_for_budget(budget, SMOL, **kwargs)


def test_mixed_attention_budget_keeps_the_first_layer_of_each_type():
    shape = KVShape.from_config(tiny_config("gemma3_text", layers=6))  # s s f s s f, window 8
    with pytest.raises(ValueError, match="below the sparsest plan \\(2 owner"):
        owners_for_budget("1", shape)
    # sliding layers hold at most 7 tokens: cheaper, so they are counted first
    per_token = 2 * 2 * 8 * 2
    assert max_owners_for_memory(shape, per_token * (7 + 100), 1, 100) == 2
    assert max_owners_for_memory(shape, per_token * (7 + 100 + 7), 1, 100) == 3


def test_presets_are_the_named_shapes_without_a_vocabulary(capsys):
    """One table: the presets training checks are the SHAPES entries without a vocabulary."""
    from kvroute.shapes import PRESETS, preset_config
    from kvroute.train.config import PRESETS as checked

    assert checked is PRESETS
    assert list(PRESETS) == [n for n, fields in SHAPES.items() if "vocab_size" not in fields]
    assert {"tiny", "qwen3-1.7b"} <= set(PRESETS) and "smollm2-135m" not in PRESETS
    assert all(PRESETS[n] is SHAPES[n] for n in PRESETS)  # views, not copies
    cfg = preset_config("tiny", vocab_size=100, layers=2)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.vocab_size) == ("qwen3", 2, 100)
    assert cfg.tie_word_embeddings and cfg.rope_parameters["rope_theta"] == 1e6
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("smollm2-135m", vocab_size=100)  # a model shape, not a pre-training preset
    # a preset is also a shape: sized without a tokenizer (4 layers x 2 x 2 KV heads x 16 x 2 bytes = 512 B)
    assert KVShape.from_config(resolve_config("qwen3-1.7b")) == KVShape(num_layers=28, kv_heads=8, head_dim=128)
    assert main(["plan", "show", "tiny", "--plan", "every:2"]) == 0
    assert "KV bytes per token (bf16): 256 B vs full 512 B" in capsys.readouterr().out
