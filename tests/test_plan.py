"""SharingPlan: spec parsing, resolution, validation, memory accounting, serialization."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from kvroute.plan import KVShape, SharingPlan, dtype_bytes, parse_plan_list

S, F = "sliding_attention", "full_attention"


@pytest.mark.parametrize(
    "spec, layers, source",
    [
        ("full", 4, (0, 1, 2, 3)),
        ("every:1", 4, (0, 1, 2, 3)),
        ("every:2", 6, (0, 0, 2, 2, 4, 4)),
        ("every:3", 7, (0, 0, 0, 3, 3, 3, 6)),
        ("every:8", 4, (0, 0, 0, 0)),
        ("keep:1", 4, (0, 1, 2, 3)),
        ("keep:0.5", 8, (0, 0, 2, 2, 4, 4, 6, 6)),
        ("keep:0.25", 8, (0, 0, 0, 0, 4, 4, 4, 4)),
        ("keep:0.01", 8, (0,) * 8),
        ("layers:0,3", 5, (0, 0, 0, 3, 3)),
        ("layers:3,0", 5, (0, 0, 0, 3, 3)),
        ("groups:2,3", 5, (0, 0, 2, 2, 2)),
        ("groups:1,1,2", 4, (0, 1, 2, 2)),
        ("source:0,0,2,2", 4, (0, 0, 2, 2)),
        ("source:0,0,1,2", 4, (0, 0, 0, 0)),  # chains resolve to the owner
        ("source:0,1,1,3,3", 5, (0, 1, 1, 3, 3)),
        (" Every:2 ", 4, (0, 0, 2, 2)),
    ],
)
def test_specs_resolve(spec, layers, source):
    plan = SharingPlan.from_spec(spec, layers)
    assert plan.source == source
    assert plan.owners == tuple(sorted(set(source)))
    assert all(s <= layer and plan.source[s] == s for layer, s in enumerate(plan.source))


def test_nonowner_reads_nearest_earlier_owner():
    plan = SharingPlan.from_owners([0, 2, 5], 8)
    assert plan.source == (0, 0, 2, 2, 2, 5, 5, 5)
    assert plan.spec == "layers:0,2,5"


def test_retention_and_describe():
    plan = SharingPlan.from_spec("every:4", 8)
    assert plan.retention == 0.25
    assert not plan.is_full and SharingPlan.from_spec("full", 3).is_full
    line = plan.describe()
    assert "every:4" in line and "2/8" in line and "25.0%" in line and "[0,4]" in line
    assert "\n" not in line


def test_typed_plan_resolves_per_type():
    types = (S, S, F, S, S, F, S, S)
    plan = SharingPlan.from_spec("every:4", 8, types)
    # the first layer of each type always owns, and no layer reads another type
    assert 2 in plan.owners and 0 in plan.owners
    for layer, s in enumerate(plan.source):
        assert types[s] == types[layer]
        assert s <= layer
    assert plan.source == (0, 0, 2, 0, 4, 2, 4, 4)
    full = SharingPlan.from_spec("full", 8, types)
    assert full.source == tuple(range(8))
    source = SharingPlan.from_spec("source:0,1,2,1,3,2,6,6", 8, types)
    assert source.source == (0, 1, 2, 1, 1, 2, 6, 6)


def test_typed_plan_rejects_cross_type_source():
    types = (S, S, F, S)
    with pytest.raises(ValueError, match=r"'source:0,0,1,3'.*cannot read"):
        SharingPlan.from_spec("source:0,0,1,3", 4, types)
    with pytest.raises(ValueError, match="first 'full_attention' layer"):
        SharingPlan.from_spec("layers:0,3", 4, types)
    # a plan built without types is checked again for a typed model
    untyped = SharingPlan.from_spec("every:2", 4)
    with pytest.raises(ValueError, match="cannot read"):
        SharingPlan.from_spec(untyped, 4, types)


def test_single_type_list_means_untyped():
    plan = SharingPlan.from_spec("every:2", 4, [F] * 4)
    assert plan.layer_types is None and plan.source == (0, 0, 2, 2)


@pytest.mark.parametrize(
    "spec, layers, why",
    [
        ("every:0", 4, "K must be a positive"),
        ("every:-2", 4, "K must be a positive"),
        ("every:two", 4, "expected an integer"),
        ("every:", 4, "expected an integer"),
        ("keep:0", 4, r"F must be in \(0, 1\]"),
        ("keep:1.5", 4, r"F must be in \(0, 1\]"),
        ("keep:-0.5", 4, r"F must be in \(0, 1\]"),
        ("keep:nan", 4, r"F must be in \(0, 1\]"),
        ("keep:half", 4, "F must be a number"),
        ("layers:0,4", 4, "layer 4 is out of range"),
        ("layers:0,-1", 4, "out of range"),
        ("layers:1,2", 4, "layer 0 must keep"),
        ("layers:0,2,2", 4, "repeat"),
        ("layers:", 4, "comma-separated"),
        ("groups:2,3", 4, "add up to 5"),
        ("groups:0,4", 4, "must be positive"),
        ("groups:2,x", 4, "comma-separated"),
        ("source:0,2,1,3", 4, "layer 1 reads layer 2"),
        ("source:1,1,2,3", 4, "layer 0 must own"),
        ("source:0,0,2", 4, "3 entries but the model has 4"),
        ("source:0,0,2,2,4", 4, "5 entries"),
        ("source:0,a,1,2", 4, "comma-separated"),
        ("full:2", 4, "takes no argument"),
        ("half", 4, "unknown kind"),
        ("", 4, "unknown kind"),
    ],
)
def test_bad_spec_raises_naming_it(spec, layers, why):
    with pytest.raises(ValueError, match=re.escape(repr(spec.strip()))) as err:
        SharingPlan.from_spec(spec, layers)
    assert re.search(why, str(err.value)), str(err.value)


def test_bad_source_map_and_lengths():
    with pytest.raises(ValueError, match="0 <= source"):
        SharingPlan((0, 2, 2))
    with pytest.raises(ValueError, match="has 4 layers but the model has 6"):
        SharingPlan.from_spec(SharingPlan.from_spec("full", 4), 6)
    with pytest.raises(ValueError, match="at least one layer"):
        SharingPlan.from_spec("full", 0)
    with pytest.raises(ValueError, match="layer types"):
        SharingPlan.from_spec("full", 4, (S, F))


def test_plan_is_immutable_and_hashable():
    plan = SharingPlan.from_spec("every:2", 4)
    with pytest.raises(AttributeError):
        plan.source = (0, 1, 2, 3)
    assert plan == SharingPlan.from_spec("every:2", 4)
    assert len({plan, SharingPlan.from_spec("every:2", 4)}) == 1


@pytest.mark.parametrize("spec", ["full", "every:3", "groups:2,3,1", "source:0,0,1,3,3,5"])
def test_dict_and_json_roundtrip(spec):
    plan = SharingPlan.from_spec(spec, 6)
    back = SharingPlan.from_dict(json.loads(plan.to_json()))
    assert back == plan and back.spec == spec
    assert plan.to_dict()["owners"] == list(plan.owners)
    assert plan.to_dict()["retention"] == plan.retention


def test_typed_dict_roundtrip():
    types = (S, S, F, S)
    plan = SharingPlan.from_spec("every:2", 4, types)
    back = SharingPlan.from_dict(plan.to_dict())
    assert back.source == plan.source and back.layer_types == types


def _config(layers, heads, kv_heads, head_dim, hidden=None, **extra):
    return SimpleNamespace(
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, hidden_size=hidden or heads * head_dim, **extra,
    )


def test_kv_bytes_per_token_matches_paper():
    llama3_8b = KVShape.from_config(_config(32, 32, 8, 128))
    qwen3_8b = KVShape.from_config(_config(36, 32, 8, 128, hidden=4096))
    assert SharingPlan.from_spec("full", 32).kv_bytes_per_token(llama3_8b, "fp16") == 128 * 1024
    assert SharingPlan.from_spec("full", 36).kv_bytes_per_token(qwen3_8b, "bf16") == 144 * 1024
    assert SharingPlan.from_spec("every:4", 36).kv_bytes_per_token(qwen3_8b, "bf16") == 36 * 1024
    import torch

    assert SharingPlan.from_spec("every:2", 32).kv_bytes_per_token(llama3_8b, torch.float32) == 128 * 1024


def test_kv_bytes_counts_sliding_windows_and_batch():
    config = _config(4, 4, 2, 8, layer_types=[S, S, F, S], sliding_window=8)
    shape = KVShape.from_config(config)
    assert shape.layer_types == (S, S, F, S) and shape.sliding_window == 8
    plan = SharingPlan.for_model("full", config)
    per_layer_token = 2 * 2 * 8 * 4
    # sliding owners hold sliding_window - 1 tokens at most
    assert plan.kv_bytes(shape, 5, dtype="fp32") == 4 * 5 * per_layer_token
    assert plan.kv_bytes(shape, 100, batch=3, dtype="fp32") == (3 * 7 + 100) * per_layer_token * 3
    with pytest.raises(ValueError, match="has 3 layers but the model has 4"):
        SharingPlan.from_spec("full", 3).kv_bytes_per_token(shape)


def test_kvshape_accounts_for_each_layer_and_plans_sum_their_owners():
    config = _config(4, 4, 2, 8, layer_types=[S, S, F, S], sliding_window=8)
    shape = KVShape.from_config(config)
    assert shape.token_bytes("fp32") == 2 * 2 * 8 * 4
    assert shape.token_bytes("fp32", "int8") == 2 * 2 * (8 + 2)  # codes + a float16 scale per head
    assert shape.layer_bytes(0, 100, batch=3, dtype="fp32") == 7 * 128 * 3  # sliding: the window's worth
    assert shape.layer_bytes(2, 100, batch=3, dtype="fp32") == 100 * 128 * 3
    from kvroute.kvquant import KVQuant

    quant = KVQuant.parse("int8")
    full, quantized = quant.split(1000)
    assert shape.layer_bytes(2, 1000, dtype="fp32", kv_quant="int8") == full * 128 + quantized * 40
    assert shape.layer_bytes(0, 1000, dtype="fp32", kv_quant="int8") == 7 * 128  # sliding layers stay unquantized
    for spec in ("full", "layers:0,2", "source:0,0,2,0"):
        plan = SharingPlan.for_model(spec, config)
        for kw in ({}, {"kv_quant": "int4"}, {"batch": 2, "dtype": "fp16"}):
            assert plan.kv_bytes(shape, 300, **kw) == sum(
                shape.layer_bytes(o, 300, kw.get("batch", 1), kw.get("dtype", "bf16"), kw.get("kv_quant"))
                for o in plan.owners)
        assert plan.kv_bytes_per_token(shape, "fp16") == len(plan.owners) * shape.token_bytes("fp16")


def test_kvshape_defaults():
    config = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=64)
    shape = KVShape.from_config(config)
    assert (shape.kv_heads, shape.head_dim, shape.layer_types) == (4, 16, None)


def test_dtype_bytes():
    assert dtype_bytes("bf16") == 2 and dtype_bytes("float32") == 4
    with pytest.raises(ValueError, match="unknown dtype"):
        dtype_bytes("int3")


@pytest.mark.parametrize(
    "text, specs",
    [
        ("full,every:2,4", ["full", "every:2", "every:4"]),
        ("keep:0.5,0.25,full", ["keep:0.5", "keep:0.25", "full"]),
        ("layers:0,3,7,every:2", ["layers:0,3,7", "every:2"]),
        ("groups:2,2,source:0,0,1", ["groups:2,2", "source:0,0,1"]),
        (" full , ", ["full"]),
    ],
)
def test_parse_plan_list(text, specs):
    assert parse_plan_list(text) == specs
    assert parse_plan_list([" full", "every:2", ""]) == ["full", "every:2"]


def test_one_dtype_table_for_accounting_and_loading():
    import torch

    from kvroute.dtypes import DTYPES, LOADABLE, resolve_dtype

    for name in LOADABLE:  # what loads has the size the accounting uses
        assert resolve_dtype(name).itemsize == dtype_bytes(name) == DTYPES[name][1]
    assert dtype_bytes(torch.bfloat16) == 2 and dtype_bytes("fp8") == dtype_bytes("int8") == 1
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8")  # counted, but not a weight dtype
