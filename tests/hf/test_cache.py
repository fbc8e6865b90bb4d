"""SharedKVCache: memory equals the plan's accounting, non-owners hold nothing, growth and cropping keep values."""

from __future__ import annotations

import pytest
import torch
from kvroute.hf.cache import DummyLayer

import kvroute
from kvroute.hf.compat import cache_kwargs, output_cache
from conftest import tiny_model
from kvroute.hf.cache import GrowingLayer, SharedKVCache
from kvroute.plan import KVShape, SharingPlan

PLANS = ["full", "every:2", "every:3", "layers:0,2,3", "source:0,0,2,1,3,2"]


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def routed(family: str, spec: str, layers: int = 6):
    return kvroute.apply(tiny_model(family, layers=layers), plan=spec)


@pytest.mark.parametrize("spec", PLANS)
@pytest.mark.parametrize("length", [5, 12])  # Gemma3's sliding window is 8
def test_cache_bytes_equal_plan_accounting(family, spec, length):
    model = routed(family, spec)
    plan = kvroute.get_router(model).plan
    shape = KVShape.from_config(model.config)
    cache = SharedKVCache.for_model(model, max_cache_len=length)
    with torch.no_grad():
        model(tokens(3, length), **cache_kwargs(cache))
    expected = plan.kv_bytes(shape, length, batch=3, dtype=torch.float32)
    assert cache.nbytes() == expected  # exact preallocation: no spare capacity
    assert cache.used_bytes() == expected
    if shape.layer_types is None:
        assert expected == plan.kv_bytes_per_token(shape, "fp32") * length * 3
    for i, layer in enumerate(cache.layers):
        if i in plan.owners:
            assert layer.keys.shape[0] == 3 and layer.keys.shape[1] == shape.kv_heads
        else:  # non-owners hold nothing
            assert isinstance(layer, DummyLayer)
            assert layer.keys is None and layer.values is None


def test_bytes_after_decode_with_exact_preallocation(family):
    model = routed(family, "every:2")
    plan = kvroute.get_router(model).plan
    shape = KVShape.from_config(model.config)
    ids = tokens(2, 10)
    cache = SharedKVCache.for_model(model, max_cache_len=10)
    with torch.no_grad():
        out = model(ids[:, :4], **cache_kwargs(cache))
        allocated = cache.nbytes()
        for t in range(4, 10):
            out = model(ids[:, t : t + 1], **cache_kwargs(output_cache(out)))
    assert output_cache(out) is cache and cache.get_seq_length() == 10
    assert cache.used_bytes() == plan.kv_bytes(shape, 10, batch=2, dtype="fp32")
    full_attention = [i for i in plan.owners if isinstance(cache.layers[i], GrowingLayer)]
    assert full_attention
    growing = sum(cache.layers[i].nbytes() for i in full_attention)
    assert growing == len(full_attention) * 2 * 2 * shape.kv_heads * shape.head_dim * 4 * 10
    assert allocated >= growing  # preallocated once, never grown


def test_fewer_owners_fewer_bytes():
    sizes = {}
    for spec in ["full", "every:2", "every:3", "every:6"]:
        model = routed("llama", spec)
        with torch.no_grad():
            sizes[spec] = output_cache(model(tokens(1, 7))).used_bytes()
    assert sizes["full"] == 2 * sizes["every:2"] == 3 * sizes["every:3"] == 6 * sizes["every:6"] > 0


def test_growth_past_capacity_keeps_values():
    model = routed("llama", "every:2")
    ids = tokens(2, 13)
    cache = SharedKVCache.for_model(model, max_cache_len=4)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :3], **cache_kwargs(cache))
        prefill_keys = cache.layers[0].keys.clone()
        logits = [out.logits]
        for t in range(3, 13):
            out = model(ids[:, t : t + 1], **cache_kwargs(cache))
            logits.append(out.logits)
    layer = cache.layers[0]
    assert layer.capacity >= 13 and layer.length == 13
    torch.testing.assert_close(layer.keys[:, :, :3], prefill_keys, atol=0, rtol=0)
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=1e-5, rtol=1e-4)


def test_growing_layer_unit():
    layer = GrowingLayer(max_cache_len=2)
    k = torch.arange(2 * 1 * 5 * 3, dtype=torch.float32).view(2, 1, 5, 3)
    for t in range(5):
        keys, values = layer.update(k[:, :, t : t + 1], -k[:, :, t : t + 1])
    assert torch.equal(keys, k) and torch.equal(values, -k)
    assert layer.get_seq_length() == 5 and layer.capacity == 8  # doubled 2 -> 4 -> 8
    layer.crop(-2)
    assert torch.equal(layer.keys, k[:, :, :3])
    with pytest.raises(ValueError, match="negative"):
        layer.crop(3)
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.keys, k[1:, :, :3])
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.keys.shape[2] == 0


def test_crop_then_decode_matches_full_forward():
    model = routed("qwen2", "every:3")
    ids = tokens(1, 10)
    other = tokens(1, 10, seed=9)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = output_cache(model(torch.cat([ids[:, :6], other[:, :3]], dim=1)))
        cache.crop(-3)  # drop the three wrong tokens
        assert cache.get_seq_length() == 6
        out = model(ids[:, 6:], **cache_kwargs(cache))
    torch.testing.assert_close(out.logits, full[:, 6:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family_", ["llama", "gemma3_text"])
def test_beam_search_with_shared_cache(family_):
    # beams reorder the cache; recomputing without a cache must pick the same beams
    model = routed(family_, "every:2")
    model.generation_config.eos_token_id = None
    ids = tokens(2, 5)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=5, num_beams=3, do_sample=False)
        uncached = model.generate(ids, max_new_tokens=5, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_cache_plan_must_fit_model():
    shape = KVShape(num_layers=4, kv_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="'full' has 3 layers"):
        SharedKVCache(SharingPlan.from_spec("full", 3), shape)
    cache = SharedKVCache(SharingPlan.from_spec("every:2", 4), shape)
    assert cache.nbytes() == 0 and cache.used_bytes() == 0


@pytest.mark.parametrize("spec", ["full", "every:2"])
def test_mistral_global_sliding_window_bounds_the_cache(spec):
    """Mistral's window holds for every layer (no layer types): owners keep at most the window,
    as transformers' own cache does, the accounting says so, and decode still equals the full forward."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from conftest import tiny_config

    config = tiny_config("mistral", layers=4)
    config.sliding_window = 6
    torch.manual_seed(0)
    model = kvroute.apply(AutoModelForCausalLM.from_config(config).eval(), plan=spec)
    shape = KVShape.from_config(model.config)
    assert shape.uniform_sliding and all(shape.slides(layer) for layer in range(4))
    ids = tokens(2, 20)
    cache = SharedKVCache.for_model(model)
    steps = []
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :8], **cache_kwargs(cache))
        steps.append(out.logits)
        for t in range(8, 20):
            steps.append(model(ids[:, t : t + 1], **cache_kwargs(cache)).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)
    plan = kvroute.get_router(model).plan
    assert cache.used_bytes() == plan.kv_bytes(shape, 20, batch=2, dtype=torch.float32)
    assert cache.used_bytes() == len(plan.owners) * 5 * 2 * (2 * shape.kv_heads * shape.head_dim * 4)  # window - 1
    if spec == "full":  # the same bytes as transformers' own cache for the unrouted model
        plain = AutoModelForCausalLM.from_config(config).eval()
        hf = DynamicCache(config=plain.config)
        with torch.no_grad():
            plain(ids, **cache_kwargs(hf))
        assert sum(layer.keys.numel() * 4 * 2 for layer in hf.layers) == cache.used_bytes()
