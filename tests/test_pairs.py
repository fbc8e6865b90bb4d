"""Pairwise maps: one set serves every plan, is exact where calibration is exact, trains with
the routes, persists beside the checkpoint (not in its weights) and folds for vLLM."""

from __future__ import annotations

import copy
import importlib
import json

import pytest
import torch
from conftest import FAST, calibratable, chunks, logits, tiny_config, tiny_model
from safetensors.torch import load_file
from textkit import make_tokenizer, write_corpus

import kvroute
from kvroute.calibrate import calibrated_sources, is_calibrated, save_calibration
from kvroute.cli import main
from kvroute.models import save_checkpoint
from kvroute.pairs import (
    PAIRS_FILE,
    add_pair_maps,
    all_pairs,
    covers,
    fit_pair_maps,
    load_pair_maps,
    pair_maps,
    pair_parameter_count,
    plan_maps,
    read_pair_maps,
)
from kvroute.plan import SharingPlan
from kvroute.router import route_key


def test_identity_pairs_change_nothing_and_full_never_uses_them():
    model = kvroute.apply(tiny_model("llama", layers=4))
    ids = chunks(3, seed=4)
    before = {p: logits(model, ids, p) for p in ("full", "every:2", "layers:0,1")}
    assert add_pair_maps(model) == len(all_pairs(model.config)) == 6
    assert is_calibrated(model, "every:2") and is_calibrated(model, "every:4") and not is_calibrated(model, "full")
    for plan, expected in before.items():
        torch.testing.assert_close(logits(model, ids, plan), expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(logits(model, ids, "full"), before["full"])  # full reads no other layer: bit-identical


@pytest.mark.parametrize("family_", ["llama", "qwen3"])
def test_one_fit_calibrates_every_plan_where_calibration_is_exact(family_):
    """On the model built so that odd layers are linear images of the even layer before them,
    the pairs fitted once (on full-cache text) make every:2 equal the full forward, and serve
    any other plan that routes those pairs too."""
    model = calibratable(family_)
    ids = chunks(4, seed=9)
    full = logits(model, ids, "full")
    assert (logits(model, ids, "every:2") - full).abs().max() > 1e-2
    result = fit_pair_maps(model, chunks(), FAST, progress=False)
    assert result.pairs == 6 and set(result.plans) == {"every:2", "every:4"}
    assert result.plans["every:2"]["pairs"] == pytest.approx(result.loss_full, abs=1e-5)
    torch.testing.assert_close(logits(model, ids, "every:2"), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(model, ids, "source:0,0,2,2"), full, atol=1e-5, rtol=1e-5)
    assert torch.equal(logits(model, ids, "full"), full)
    assert covers(model, SharingPlan.for_model("every:4", model.config))


def test_pairs_are_per_kv_head_and_a_small_share_of_an_8b_model():
    """L(L-1)/2 pairs x (KV heads x D^2 + heads x D): under 2% of Llama-3-8B's parameters."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    model = kvroute.apply(tiny_model("llama", layers=4))
    add_pair_maps(model)
    counted = sum(t.numel() for m in pair_maps(model).values() for t in (m.query, m.value))
    assert counted == pair_parameter_count(model.config)
    assert pair_maps(model)[(1, 0)].value.shape[0] == model.config.num_key_value_heads
    llama8b = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    with torch.device("meta"):
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(llama8b).parameters())
    assert 7.9e9 < size < 8.1e9
    assert pair_parameter_count(llama8b) == 496 * (8 * 128 * 128 + 32 * 128)
    assert pair_parameter_count(llama8b) / size < 0.02


def test_pairs_follow_layer_types():
    config = tiny_config("gemma3_text", 6, "sdpa")
    types = config.layer_types
    assert len(set(types)) == 2  # sliding and full layers
    pairs = all_pairs(config)
    assert pairs and all(types[o] == types[l] and o < l for l, o in pairs)
    assert len(pairs) < 15  # fewer than all 6 * 5 / 2


def test_saved_beside_the_checkpoint_not_in_its_weights(tmp_path):
    model = calibratable("llama")
    fit_pair_maps(model, chunks(), FAST, progress=False)
    ids = chunks(2, seed=5)
    expected = logits(model, ids, "every:2")
    folder = save_checkpoint(model, tmp_path / "ckpt")
    assert not any("pairs" in k for k in load_file(str(folder / "model.safetensors")))
    meta, maps = read_pair_maps(folder)
    assert len(maps) == 6 and meta["info"]["fit"]["pairs"] == 6
    loaded = kvroute.load(folder, plan="every:2")
    torch.testing.assert_close(logits(loaded, ids, "every:2"), expected)
    twin = copy.deepcopy(loaded)
    torch.testing.assert_close(logits(twin, ids, "every:2"), expected)
    other = kvroute.apply(tiny_model("llama", layers=4, seed=3))
    with pytest.raises(ValueError, match="other weights"):
        load_pair_maps(other, folder)


def test_decode_through_the_shared_cache_equals_the_full_forward():
    model = calibratable("llama")
    fit_pair_maps(model, chunks(), FAST, progress=False)
    kvroute.set_plan(model, "every:2")
    ids = chunks(1, t=12, seed=6)
    with torch.no_grad():
        whole = model(input_ids=ids, use_cache=False).logits
        out = model(input_ids=ids[:, :8], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(8, 12):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), whole, atol=1e-5, rtol=1e-4)


def test_vllm_folds_a_plan_taken_from_the_pairs(tmp_path):
    from kvroute.vllm import CALIBRATION_TENSOR, plan_calibration, resolve_plan

    model = calibratable("llama")
    fit_pair_maps(model, chunks(), FAST, progress=False)
    folder = save_checkpoint(model, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    fold = plan_calibration(folder, config, resolve_plan(config, "every:2"))
    assert fold is not None and fold.path.name == PAIRS_FILE and sorted(fold.maps) == [1, 3]
    assert fold.maps[1].value.shape == (config["num_attention_heads"], 8, 8)
    weights = load_file(str(folder / "model.safetensors"))
    folded = dict(fold.fold(weights.items(), queries=True))
    twin = kvroute.load(folder, plan="every:2")
    ids = chunks(2, seed=8)
    expected = logits(twin, ids, "every:2")
    for att in twin.modules():
        if hasattr(att, "pairs"):
            att.pairs.clear()
    twin.load_state_dict(folded, strict=False)
    torch.testing.assert_close(logits(twin, ids, "every:2"), expected, atol=1e-5, rtol=1e-4)
    assert all(CALIBRATION_TENSOR.match(k) for k in load_file(str(folder / PAIRS_FILE)))
    assert plan_maps(read_pair_maps(folder)[1], SharingPlan.for_model("full", model.config), 4) is None


# ---------------------------------------------------------------------------- training
@pytest.fixture
def checkpoint(tmp_path):
    from transformers import AutoTokenizer

    model = kvroute.apply(tiny_model("llama", layers=4))
    tok = make_tokenizer(tmp_path / "tok")
    return save_checkpoint(model, tmp_path / "ckpt", AutoTokenizer.from_pretrained(tok))


def _train(tmp_path, model, corpus, **kw):
    from kvroute.train import TrainConfig, train

    config = dict(model=str(model), data=[str(corpus)], output_dir=str(tmp_path / "run"), seq_len=32, batch_size=4,
                  max_steps=4, lr=1e-3, routing="rcla", p=0.3, eval_every=0, tensorboard=False, quiet=True,
                  device="cpu", precision="fp32", cache_dir=str(tmp_path / "cache"))
    return train(TrainConfig(**{**config, **kw}))


def test_cli_fits_pairs_and_training_starts_from_them(tmp_path, checkpoint, capsys):
    corpus = write_corpus(tmp_path / "text", docs=30, length=80)
    assert main(["calibrate", str(checkpoint), "--pairs", "--data", str(corpus), "--tokens", "1024",
                 "--chunk-tokens", "32", "--quiet"]) == 0
    assert "pairwise maps: 6 pairs" in capsys.readouterr().out
    fitted = pair_maps(kvroute.load(checkpoint))
    assert len(fitted) == 6
    result = _train(tmp_path, checkpoint, corpus, pair_maps=True, pair_lr=1e-2)
    assert "pairwise maps: 6 from" in capsys.readouterr().out
    tuned = kvroute.load(result.final_checkpoint)  # the saved maps match the new weights' digest
    trained = pair_maps(tuned)
    assert set(trained) == set(fitted)
    moved = [p for p in trained if not torch.allclose(trained[p].value, fitted[p].value)]
    assert moved  # the routes drawn trained their pairs
    assert is_calibrated(tuned, "every:2")


def test_the_maps_train_at_their_own_rate_and_never_decay():
    from kvroute.train import TrainConfig, _optimizer

    model = kvroute.apply(tiny_model("llama", layers=4))
    add_pair_maps(model)
    config = TrainConfig(model="m", data=["d"], pair_maps=True, lr=1e-4, pair_lr=1e-2, weight_decay=0.5)
    groups = _optimizer(model, config).param_groups
    pairs = {id(t) for m in pair_maps(model).values() for t in (m.query, m.value)}
    (group,) = [g for g in groups if {id(p) for p in g["params"]} & pairs]
    assert {id(p) for p in group["params"]} == pairs
    assert group["weight_decay"] == 0.0 and group["lr"] == 1e-2
    assert any(g["weight_decay"] == 0.5 for g in groups)


def test_training_from_the_identity(tmp_path, checkpoint):
    corpus = write_corpus(tmp_path / "text", docs=30, length=80)
    result = _train(tmp_path, checkpoint, corpus, pair_maps=True, max_steps=2)
    maps = pair_maps(kvroute.load(result.final_checkpoint))
    assert len(maps) == 6
    assert any(not torch.allclose(m.value, torch.eye(m.value.shape[-1]).expand_as(m.value)) for m in maps.values())


def test_training_without_the_flag_leaves_pairs_out(tmp_path, checkpoint):
    corpus = write_corpus(tmp_path / "text", docs=30, length=80)
    result = _train(tmp_path, checkpoint, corpus, max_steps=1)
    assert not (result.final_checkpoint / PAIRS_FILE).exists()


def test_bad_pair_input_is_refused(tmp_path, checkpoint, capsys):
    from kvroute.train import TrainConfig

    with pytest.raises(ValueError, match="--pair-maps needs a routing policy that routes"):
        TrainConfig(model="m", data=["d"], routing="none", pair_maps=True)
    with pytest.raises(ValueError, match="LoRA"):
        TrainConfig(model="m", data=["d"], pair_maps=True, lora_r=4)
    with pytest.raises(ValueError, match="--pair-lr must be positive"):
        TrainConfig(model="m", data=["d"], pair_maps=True, pair_lr=0.0)
    assert main(["calibrate", str(checkpoint), "--data", str(tmp_path)]) == 2
    assert "--plans: give the plans to calibrate" in capsys.readouterr().err
    model = kvroute.apply(tiny_model("llama", layers=4))
    with pytest.raises(ValueError, match="no route reads layer 2's KV from layer 1"):
        from kvroute.pairs import identity_maps, set_pair_maps

        set_pair_maps(model, {(1, 2): identity_maps(model.config)})


def test_maps_only_trains_the_maps_and_leaves_the_weights(tmp_path, checkpoint):
    from kvroute.train import TrainConfig

    corpus = write_corpus(tmp_path / "text", docs=30, length=80)
    result = _train(tmp_path, checkpoint, corpus, pair_maps=True, maps_only=True, lr=1e-2, distill=1.0)
    tuned, start = kvroute.load(result.final_checkpoint), kvroute.load(checkpoint)
    weights = {k: v for k, v in tuned.state_dict().items() if ".pairs." not in k}
    before = start.state_dict()
    assert weights.keys() == before.keys()
    assert all(torch.equal(weights[k], before[k]) for k in weights)
    maps = pair_maps(tuned)
    assert any(not torch.allclose(m.value, torch.eye(m.value.shape[-1]).expand_as(m.value)) for m in maps.values())
    with pytest.raises(ValueError, match="--maps-only trains the pairwise maps alone"):
        TrainConfig(model="m", data=["d"], maps_only=True)


def test_a_plan_fit_that_loses_to_the_pairs_is_dropped(tmp_path, monkeypatch):
    """calibrate() keeps a plan's own fit only if it beats the pairwise maps that served the plan: after
    exact pairwise maps, a worse per-plan fit (its value maps scaled by -8 here) is dropped, the pairs
    still serve the plan, and nothing is recorded or saved for it."""
    calibrate_module = importlib.import_module("kvroute.calibrate")  # the module, not kvroute.calibrate()

    model = calibratable("llama")
    ids = chunks(4, seed=9)
    fit_pair_maps(model, chunks(), FAST, progress=False)
    served = logits(model, ids, "every:2")
    real_fit = calibrate_module.fit_plan

    def worse_fit(model, plan, *args, **kwargs):
        ridges = real_fit(model, plan, *args, **kwargs)
        key = route_key(plan.source)
        for layer in model.model.layers:
            if key in layer.self_attn.calibration:
                layer.self_attn.calibration[key].value.data.mul_(-8.0)
        return ridges

    monkeypatch.setattr(calibrate_module, "fit_plan", worse_fit)
    (result,) = kvroute.calibrate(model, "every:2", chunks(), FAST, progress=False)
    assert not result.kept and result.loss == result.loss_plain < result.loss_closed_form
    assert "not kept" in result.summary()
    assert result.source not in calibrated_sources(model) and is_calibrated(model, "every:2")
    torch.testing.assert_close(logits(model, ids, "every:2"), served, atol=0, rtol=0)
    assert save_calibration(model, tmp_path) is None
    model = calibratable("llama")  # without pairs a fit always stays, the same worse one included
    (result,) = kvroute.calibrate(model, "every:2", chunks(), FAST, progress=False)
    assert result.kept and "layers mapped" in result.summary() and result.source in calibrated_sources(model)
