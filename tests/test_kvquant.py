"""KV quantization x sharing: round-trip error, decode through a quantized shared cache, exact bytes."""

from __future__ import annotations

import pytest
import torch

import kvroute
from conftest import tiny_model
from kvroute.hf.cache import QuantizedLayer, SharedKVCache
from kvroute.hf.compat import cache_kwargs
from kvroute.kvquant import KVQuant
from kvroute.plan import KVShape, SharingPlan


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_error_is_within_half_a_step(bits):
    quant = KVQuant(bits)
    x = torch.randn(2, 3, 17, 64) * torch.linspace(0.01, 5, 17)[:, None]
    codes, scale = quant.quantize(x)
    assert codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert codes.shape[-1] == (64 if bits == 8 else 32) and scale.dtype == torch.float16
    back = quant.dequantize(codes, scale, torch.float32)
    step = x.abs().amax(-1, keepdim=True) / quant.qmax
    assert ((back - x).abs() <= step * 0.5 * (1 + 1e-2) + 1e-6).all()  # rounding, plus the float16 scale
    assert quant.entry_bytes(64) == codes.shape[-1] + 2


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize_into_a_slice_rounds_once_like_the_float32_product(bits):
    quant = KVQuant(bits)
    codes, scale = quant.quantize(torch.randn(1, 2, 9, 16))
    ints = codes
    if bits == 4:  # unpack by hand: low nibble first
        ints = torch.stack(((codes & 15).to(torch.int8) - 8, (codes >> 4).to(torch.int8) - 8), -1).flatten(-2)
    expected = (ints.float() * scale.float()).to(torch.bfloat16)
    out = torch.zeros(1, 2, 12, 16, dtype=torch.bfloat16)
    quant.dequantize(codes, scale, torch.bfloat16, out=out[:, :, :9])
    assert torch.equal(out[:, :, :9], expected) and not out[:, :, 9:].any()
    assert torch.equal(quant.dequantize(codes, scale, torch.bfloat16), expected)
    with pytest.raises(ValueError, match="expected"):
        quant.dequantize(codes, scale, torch.bfloat16, out=out)


def test_bad_kv_quant_is_a_clear_error():
    assert KVQuant.parse("none") is None and KVQuant.parse(None) is None
    with pytest.raises(ValueError, match="--kv-quant must be one of none, int8, int4, got 'fp3'"):
        KVQuant.parse("fp3")


@pytest.mark.parametrize("spec", ["full", "every:2"])
@pytest.mark.parametrize("kv_quant, atol", [("int8", 2e-2), ("int4", 2e-1)])
def test_decode_through_a_quantized_shared_cache(family, spec, kv_quant, atol):
    """Cached decode reads quantized KV for tokens past the residual window: it stays close to the
    full-precision forward (int8 closer than int4), and the cache holds exactly the accounted bytes."""
    model = kvroute.apply(tiny_model(family, layers=6), plan=spec)
    quant = KVQuant(int(kv_quant[3:]), residual=4)
    cache = SharedKVCache.for_model(model, kv_quant=quant)
    ids = torch.randint(3, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        steps = [model(ids[:, :6], **cache_kwargs(cache)).logits]
        for t in range(6, 20):
            steps.append(model(ids[:, t : t + 1], **cache_kwargs(cache)).logits)
    decoded = torch.cat(steps, dim=1)
    error = (decoded - full).abs().max()
    assert 0 < error < atol  # quantized, and close
    plan, shape = kvroute.get_router(model).plan, KVShape.from_config(model.config)
    assert cache.used_bytes() == plan.kv_bytes(shape, 20, batch=2, dtype=torch.float32, kv_quant=quant)
    assert any(isinstance(layer, QuantizedLayer) for layer in cache.layers)


def test_generate_and_beam_search_through_a_quantized_cache():
    model = kvroute.apply(tiny_model("llama", layers=6), plan="every:2")
    kvroute.set_kv_quant(model, "int8")
    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        beams = model.generate(ids, max_new_tokens=6, do_sample=False, num_beams=3, pad_token_id=0)
        prompt_lookup = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                       prompt_lookup_num_tokens=3)
    assert greedy.shape == beams.shape == (1, 46)
    assert torch.equal(prompt_lookup, greedy)  # crop() on a quantized cache drops exactly the rejected drafts
    kvroute.set_kv_quant(model, None)


def test_memory_multiplies_every4_int4_under_a_fourteenth_of_full_bf16():
    shape = KVShape(num_layers=30, kv_heads=3, head_dim=64)  # SmolLM2-135M
    full = SharingPlan.from_spec("full", 30).kv_bytes_per_token(shape, "bf16")
    every4 = SharingPlan.from_spec("every:4", 30)
    assert every4.kv_bytes_per_token(shape, "bf16", kv_quant="int4") <= full / 14
    assert every4.kv_bytes_per_token(shape, "bf16", kv_quant="int8") == 2 * 8 * 3 * (64 + 2)
    # long contexts approach the per-token figure; the residual window costs full precision
    tokens = 4096
    held = every4.kv_bytes(shape, tokens, dtype="bf16", kv_quant=KVQuant(4))
    assert held == 2 * 8 * 3 * (32 * 64 * 2 + (tokens - 32) * 34)


def test_eval_runs_every_plan_under_each_kv_quant(tmp_path, capsys):
    import json

    from textkit import make_model_dir, write_corpus

    from kvroute.cli import main

    ckpt = make_model_dir(tmp_path / "ckpt", layers=4, tokenizer="chars")
    text = write_corpus(tmp_path / "text", docs=3, length=80)
    out = tmp_path / "out"
    assert main(["eval", str(ckpt), "--plans", "full,every:2", "--text", str(text), "--out", str(out),
                 "--window", "64", "--kv-quant", "none,int8,int4", "--no-plot"]) == 0
    table = capsys.readouterr().out
    assert "every:2 + int4" in table
    rows = {(r["plan"], r["kv_quant"]): r for r in json.loads((out / "results.json").read_text())["rows"]
            if r["metric"] == "loss"}
    assert set(rows) == {(p, q) for p in ("full", "every:2") for q in ("none", "int8", "int4")}
    kib = {k: r["kv_kib_per_token"] for k, r in rows.items()}
    assert kib["every:2", "int4"] < kib["every:2", "int8"] < kib["every:2", "none"] < kib["full", "none"]
    assert rows["full", "none"]["delta_vs_full"] == 0.0  # the reference: full, full precision
    for plan in ("full", "every:2"):  # int8 stays close to full precision, int4 moves further
        none, int8, int4 = (rows[plan, q]["value"] for q in ("none", "int8", "int4"))
        assert abs(int8 - none) < 0.01 and abs(int8 - none) <= abs(int4 - none) + 1e-9
    assert main(["eval", str(ckpt), "--text", str(text), "--kv-quant", "int2"]) == 2
    assert "--kv-quant must be one of" in capsys.readouterr().err


def test_bench_measures_quantized_caches_and_their_capacity(tmp_path):
    from kvroute.bench import BenchConfig, run_bench, write_report

    config = BenchConfig(model="smollm2-135m", plans=["full", "every:4"], contexts=[48], batches=[1],
                         new_tokens=2, repeats=1, warmup=0, kv_budget=2**20, kv_quant="none,int8,int4",
                         baseline=False)
    model = tiny_model("llama", layers=8)
    report = run_bench(config, model=model, progress=False)
    rows = {(r["plan"], r["kv_quant"]): r for r in report.rows}
    assert set(rows) == {(p, q) for p in ("full", "every:4") for q in ("none", "int8", "int4")}
    for r in rows.values():
        assert r["kv_bytes"] == r["kv_expected_bytes"]  # measured bytes equal the accounting exactly
    assert rows["full", "none"]["kv_vs_full"] == 1.0
    batches = [rows["every:4", q]["max_batch"] for q in ("none", "int8", "int4")]
    assert batches[0] < batches[1] < batches[2]  # capacity grows with the quantization
    paths = write_report(report, tmp_path, command="kvroute bench")
    assert "every:4 + int4" in paths["md"].read_text()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fast_dequantize_is_the_float32_product_rounded_once(bits, dtype):
    """With 16-bit scales in the output dtype (a bf16 cache stores bf16 scales), dequantizing takes the
    cast-and-multiply path; it must equal the float32 product rounded once, written into a view."""
    quant = KVQuant(bits)
    scale_dtype = dtype if dtype != torch.float32 else torch.float16
    x = torch.randn(2, 3, 17, 16) * torch.logspace(-3, 2, 17)[:, None]
    codes, scale = quant.quantize(x, scale_dtype)
    assert scale.dtype == scale_dtype
    ints = codes if bits == 8 else torch.stack(((codes & 15).to(torch.int8) - 8, (codes >> 4).to(torch.int8) - 8),
                                               -1).flatten(-2)
    expected = (ints.float() * scale.float()).to(dtype)
    out = torch.full((2, 3, 20, 16), 7.0, dtype=dtype)
    quant.dequantize(codes, scale, dtype, out=out[:, :, :17])
    assert torch.equal(out[:, :, :17], expected) and (out[:, :, 17:] == 7).all()
    step = scale.float()
    assert ((expected.float() - x).abs() <= step * 0.5 * (1 + 2e-2) + x.abs() * 1e-2 + 1e-6).all()
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        quant.quantize(x, torch.float32)


@pytest.mark.parametrize("max_len", [None, 12, 40])
def test_quantized_layer_buffers_grow_crop_and_reorder(max_len):
    """Codes live in buffers that grow in place: what the layer returns equals quantizing the tokens
    appended so far, through growth past the preallocation, crops into the quantized history and beam
    reorders; used bytes count the tokens held, allocated bytes the capacity too."""
    quant = KVQuant(8, residual=4)
    layer = QuantizedLayer(quant, max_len)
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 0, 8)

    def expect(k: torch.Tensor) -> torch.Tensor:
        old = max(0, k.shape[-2] - quant.residual)
        codes, scale = quant.quantize(k[:, :, :old])
        return torch.cat((quant.dequantize(codes, scale, torch.float32), k[:, :, old:]), dim=-2)

    for n in (7, 1, 1, 9, 1, 20):
        new = torch.randn(2, 3, n, 8, generator=g)
        keys = torch.cat((keys, new), dim=-2)
        k, v = layer.update(new, -new)
        assert torch.equal(k, expect(keys)) and torch.equal(v, expect(-keys))
    assert layer.capacity >= layer.quantized == keys.shape[-2] - 4
    per_token = 2 * 2 * 3 * (8 + 2)  # K and V, batch 2, 3 heads, 8 codes + a 2-byte scale
    assert layer.used_bytes() == layer.quantized * per_token + 2 * keys[:, :, -4:].numel() * 4
    assert layer.nbytes() == layer.capacity * per_token + 2 * keys[:, :, -4:].numel() * 4
    layer.crop(-10)  # four residual tokens and six quantized ones
    keys = keys[:, :, :-10]
    layer.reorder_cache(torch.tensor([1, 0]))
    keys = keys.flip(0)
    new = torch.randn(2, 3, 1, 8, generator=g)
    keys = torch.cat((keys, new), dim=-2)
    k, _ = layer.update(new, -new)
    # the crop left no residual: the new token is full precision, the rest as quantized before
    assert k.shape[-2] == keys.shape[-2] == layer.get_seq_length()
    assert torch.equal(k[:, :, -1:], new)
    codes, scale = quant.quantize(keys[:, :, :-1])
    torch.testing.assert_close(k[:, :, :-1], quant.dequantize(codes, scale, torch.float32))
