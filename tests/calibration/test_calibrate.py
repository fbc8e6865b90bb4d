"""Per-plan calibration: exact on a model built to be calibratable, never touches `full`,
persists with the checkpoint, works through the shared cache, and rejects bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, calibratable, chunks, logits, tiny_model
from textkit import make_tokenizer, write_corpus

import kvroute
from kvroute.calibrate import (
    CALIBRATION_FILE,
    CalibrationConfig,
    calibrate,
    calibrated_sources,
    is_calibrated,
    load_calibration,
    refine,
    save_calibration,
)
from kvroute.cli import main
from kvroute.hf.attention import LayerMaps
from kvroute.models import save_checkpoint

@pytest.mark.parametrize("family_", ["llama", "qwen3"])
def test_exactly_calibratable_model_matches_full(family_):
    model = calibratable(family_)
    ids = chunks(4, seed=9)
    full = logits(model, ids, "full")
    plain = logits(model, ids, "every:2")
    assert (plain - full).abs().max() > 1e-2  # the plan alone is wrong: the values differ
    calibrate(model, "every:2", chunks(), FAST, progress=False)
    assert is_calibrated(model, "every:2")
    torch.testing.assert_close(logits(model, ids, "every:2"), full, atol=1e-5, rtol=1e-5)


def test_bf16_passes_fit_nearly_as_well():
    """precision="bf16" runs the capture and the sequential pass under bf16 autocast (the fit stays float32):
    on the exactly calibratable model it lands near the exact fit, far below the plan's plain error."""
    model = calibratable("llama")
    ids = chunks(4, seed=9)
    full = logits(model, ids, "full")
    plain_err = (logits(model, ids, "every:2") - full).abs().max()
    calibrate(model, "every:2", chunks(), CalibrationConfig(**{**FAST.__dict__, "precision": "bf16"}), progress=False)
    err = (logits(model, ids, "every:2") - full).abs().max()
    assert err < 0.05 * plain_err, (err, plain_err)
    assert logits(model, ids, "full").equal(full)  # full untouched


def kl_to_full(model, ids: torch.Tensor, plan: str) -> float:
    full = logits(model, ids, "full").log_softmax(-1)
    shared = logits(model, ids, plan).log_softmax(-1)
    return torch.nn.functional.kl_div(shared.flatten(0, 1), full.flatten(0, 1), log_target=True,
                                      reduction="batchmean").item()


def test_calibration_never_changes_full_and_helps_on_held_out_chunks():
    model = kvroute.apply(tiny_model("llama", layers=4))
    ids = chunks(8, seed=9)  # not calibration chunks
    before = logits(model, ids, "full")
    plain = kl_to_full(model, ids, "every:2")
    results = calibrate(model, ["full", "every:2"], chunks(), FAST, progress=False)
    assert [r.plan for r in results] == ["every:2"]  # full has nothing to fit
    assert not is_calibrated(model, "full")
    assert torch.equal(logits(model, ids, "full"), before)
    assert kl_to_full(model, ids, "every:2") < 0.5 * plain
    r = results[0]
    assert r.layers == 2 and set(r.ridges) == {1, 3}


def test_set_plan_switches_between_calibrated_plans():
    model = kvroute.apply(tiny_model("qwen2", layers=6))
    ids = chunks(2, seed=5)
    plain = {p: logits(model, ids, p) for p in ("every:2", "every:3")}
    calibrate(model, "every:2,every:3", chunks(), FAST, progress=False)
    assert calibrated_sources(model) == sorted([(0, 0, 2, 2, 4, 4), (0, 0, 0, 3, 3, 3)])
    cal = {p: logits(model, ids, p) for p in ("every:2", "every:3")}
    for p in cal:
        assert not torch.allclose(cal[p], plain[p])
    assert torch.equal(logits(model, ids, "every:2"), cal["every:2"])  # back and forth
    uncalibrated = kvroute.apply(tiny_model("qwen2", layers=6))
    assert torch.equal(logits(model, ids, "every:4"), logits(uncalibrated, ids, "every:4"))  # no maps for it
    assert not is_calibrated(model, "every:4")


def test_one_value_map_per_kv_head_is_shared_by_its_query_heads():
    model = kvroute.apply(tiny_model("llama", layers=4))  # 4 query heads, 2 KV heads
    config = CalibrationConfig(**{**FAST.__dict__, "query": False, "value_maps": "group"})
    calibrate(model, "every:2", chunks(), config, progress=False)
    value = model.model.layers[1].self_attn.calibration["r0_0_2_2"].value  # (H, D, D)
    assert model.model.layers[1].self_attn.calibration["r0_0_2_2"].query is None
    assert torch.equal(value[0], value[1]) and torch.equal(value[2], value[3]) and not torch.equal(value[1], value[2])


def test_save_load_round_trip_and_copies(tmp_path):
    model = kvroute.apply(tiny_model("gemma3_text", layers=6))
    ids = chunks(2, seed=3)
    calibrate(model, "every:2", chunks(), FAST, progress=False)
    expected = logits(model, ids, "every:2")
    out = save_checkpoint(model, tmp_path / "ckpt")
    assert (out / CALIBRATION_FILE).is_file()
    loaded = kvroute.load(out)
    assert is_calibrated(loaded, "every:2")
    torch.testing.assert_close(logits(loaded, ids, "every:2"), expected)
    assert not any("calibration" in k for k in loaded.state_dict())  # weights file stays plain HF
    import copy

    twin = copy.deepcopy(model)
    assert is_calibrated(twin, "every:2")


def test_decode_through_the_shared_cache_equals_full_forward_under_a_calibrated_plan():
    model = kvroute.apply(tiny_model("llama", layers=4))
    calibrate(model, "every:2", chunks(), FAST, progress=False)
    ids = chunks(1, t=20, seed=4)
    full_forward = logits(model, ids, "every:2")
    cache = kvroute.SharedKVCache.for_model(model)
    steps = [model(input_ids=ids[:, :12], past_key_values=cache, use_cache=True).logits]
    for t in range(12, 20):
        steps.append(model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full_forward, atol=1e-5, rtol=1e-4)


def test_refinement_lowers_the_training_kl():
    model = kvroute.apply(tiny_model("llama", layers=4))
    data = chunks()
    calibrate(model, "every:2", data, CalibrationConfig(**{**FAST.__dict__, "query": False}), progress=False)
    plan = kvroute.set_plan(model, "every:2")

    def kl() -> float:
        return kl_to_full(model, data, "every:2")

    before = kl()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    refine(model, plan, data, CalibrationConfig(**{**FAST.__dict__, "steps": 30, "lr": 3e-3}), progress=False)
    assert kl() < 0.9 * before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # only the maps moved
    assert all(p.requires_grad for p in model.parameters())


def test_layer_maps_commute_with_rope():
    from kvroute.hf.attention import apply_rope

    h, d, t = 2, 8, 5
    a = torch.randn(h, d // 2, 2)
    q = torch.randn(1, h, t, d)
    pos = torch.arange(t).float()
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = torch.cat([pos[:, None] * inv] * 2, dim=-1)[None]
    cos, sin = ang.cos(), ang.sin()
    maps = LayerMaps(a, None)
    torch.testing.assert_close(apply_rope(maps.map_query(q), cos, sin), maps.map_query(apply_rope(q, cos, sin)))


# ------------------------------------------------------------------------- errors
def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="too few to calibrate"):
        CalibrationConfig(tokens=100)
    with pytest.raises(ValueError, match="value-maps"):
        CalibrationConfig(value_maps="all")
    model = kvroute.apply(tiny_model("llama", layers=4))
    with pytest.raises(ValueError, match="unknown plan|plan 'every:x'|every:x"):
        calibrate(model, "every:x", chunks(), FAST, progress=False)
    with pytest.raises(ValueError, match="N >= 2"):
        calibrate(model, "every:2", chunks(1), FAST, progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        calibrate(model, "every:2", ["some/folder"], FAST, progress=False)


def test_a_calibration_for_another_model_is_refused(tmp_path):
    model = kvroute.apply(tiny_model("llama", layers=4))
    calibrate(model, "every:2", chunks(), FAST, progress=False)
    save_calibration(model, tmp_path)
    other = kvroute.apply(tiny_model("llama", layers=4, seed=7))  # same shape, other weights
    with pytest.raises(ValueError, match="other weights"):
        load_calibration(other, tmp_path)
    deeper = kvroute.apply(tiny_model("llama", layers=6))
    with pytest.raises(ValueError, match="num_layers"):
        load_calibration(deeper, tmp_path)
    assert calibrated_sources(other) == [] and calibrated_sources(deeper) == []


# ---------------------------------------------------------------------------- CLI
@pytest.fixture
def checkpoint(tmp_path):
    model = kvroute.apply(tiny_model("llama", layers=4))
    tok = make_tokenizer(tmp_path / "tok")
    from transformers import AutoTokenizer

    return save_checkpoint(model, tmp_path / "ckpt", AutoTokenizer.from_pretrained(tok))


def test_cli_calibrates_in_place_and_to_a_new_folder(tmp_path, checkpoint, capsys):
    corpus = write_corpus(tmp_path / "text", docs=30, length=80)
    args = ["calibrate", str(checkpoint), "--plans", "every:2", "--data", str(corpus), "--tokens", "1024",
            "--chunk-tokens", "32", "--quiet"]
    assert main(args) == 0
    assert "every:2: held-out calibration ppl" in capsys.readouterr().out
    assert is_calibrated(kvroute.load(checkpoint), "every:2")
    assert main(args[:2] + ["--plans", "every:3", "--out", str(tmp_path / "new")] + args[4:]) == 0
    new = kvroute.load(tmp_path / "new")
    assert is_calibrated(new, "every:2") and is_calibrated(new, "every:3")  # the old plan is kept


def test_cli_errors_leave_nothing_written(tmp_path, checkpoint, capsys):
    corpus = write_corpus(tmp_path / "text", docs=30, length=80)
    base = ["calibrate", str(checkpoint), "--data", str(corpus), "--chunk-tokens", "32", "--quiet"]
    assert main(base + ["--plans", "every:2,every:zz", "--tokens", "1024"]) == 2
    assert main(base + ["--plans", "every:2", "--tokens", "64"]) == 2
    assert main(base + ["--plans", "every:2", "--tokens", "100000"]) == 2
    assert main(["calibrate", str(checkpoint), "--plans", "every:2", "--data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "every:zz" in err and "too few to calibrate" in err and "fewer than half" in err and "nope" in err
    assert not (checkpoint / CALIBRATION_FILE).exists()


def test_plan_targeted_fine_tune_trains_with_the_maps_and_saves_them(tmp_path, checkpoint):
    """calibrate, then `--routing plan:every:2`: the route is the calibrated plan, so the maps act
    during training; the fine-tuned checkpoint carries them (matched to its new weights)."""
    from kvroute.train import TrainConfig, train

    corpus = write_corpus(tmp_path / "text", docs=30, length=80)
    assert main(["calibrate", str(checkpoint), "--plans", "every:2", "--data", str(corpus), "--tokens", "1024",
                 "--chunk-tokens", "32", "--quiet"]) == 0
    calibrated = kvroute.load(checkpoint)
    result = train(TrainConfig(model=str(checkpoint), data=[str(corpus)], output_dir=str(tmp_path / "run"),
                               seq_len=32, batch_size=4, max_steps=3, lr=1e-2, routing="plan:every:2",
                               eval_every=0, tensorboard=False, quiet=True, device="cpu",
                               cache_dir=str(tmp_path / "cache")))
    tuned = kvroute.load(result.final_checkpoint)  # the digest matches the new weights
    assert is_calibrated(tuned, "every:2")
    assert not torch.equal(tuned.model.layers[1].self_attn.q_proj.weight, calibrated.model.layers[1].self_attn.q_proj.weight)
    before = dict(calibrated.model.layers[1].self_attn.calibration.named_buffers())
    after = dict(tuned.model.layers[1].self_attn.calibration.named_buffers())
    assert set(after) == set(before) == {"r0_0_2_2.query", "r0_0_2_2.value"}
    for name, tensor in after.items():  # the maps stay fixed; the weights learn around them
        torch.testing.assert_close(tensor, before[name])


def test_a_fine_tune_for_several_plans_trains_with_each_plans_maps(tmp_path, checkpoint):
    """`--routing plan:full+every:2+every:4`: each pass routes as one of the plans and its maps act;
    the named plans' calibrations are carried, any other plan's is dropped (stale once weights move)."""
    from kvroute.train import TrainConfig, train

    corpus = write_corpus(tmp_path / "text", docs=30, length=80)
    assert main(["calibrate", str(checkpoint), "--plans", "every:2,every:4,every:3", "--data", str(corpus),
                 "--tokens", "1024", "--chunk-tokens", "32", "--quiet"]) == 0
    seen: list[tuple[int, ...]] = []
    result = train(TrainConfig(model=str(checkpoint), data=[str(corpus)], output_dir=str(tmp_path / "run"),
                               seq_len=32, batch_size=4, max_steps=8, lr=1e-2, routing="plan:full+every:2+every:4",
                               eval_every=0, tensorboard=False, quiet=True, device="cpu",
                               cache_dir=str(tmp_path / "cache")), callbacks=[lambda info: seen.extend(info.routes)])
    assert set(seen) == {(0, 1, 2, 3), (0, 0, 2, 2), (0, 0, 0, 0)}  # 8 draws from 3 plans: each came up
    tuned = kvroute.load(result.final_checkpoint)
    assert kvroute.get_router(tuned).plan.spec == "full"
    assert is_calibrated(tuned, "every:2") and is_calibrated(tuned, "every:4")
    assert not is_calibrated(tuned, "every:3")


def test_a_mix_with_rcla_carries_the_calibrations_of_its_named_plans(tmp_path, checkpoint):
    """`--routing "mix:rcla|plan:every:2+every:4"`: the plan passes use the named plans' maps, so those
    are carried; the model serves any plan (R-CLA), and another plan's calibration is dropped."""
    from kvroute.train import TrainConfig, train

    corpus = write_corpus(tmp_path / "text", docs=30, length=80)
    assert main(["calibrate", str(checkpoint), "--plans", "every:2,every:4,every:3", "--data", str(corpus),
                 "--tokens", "1024", "--chunk-tokens", "32", "--quiet"]) == 0
    result = train(TrainConfig(model=str(checkpoint), data=[str(corpus)], output_dir=str(tmp_path / "run"),
                               seq_len=32, batch_size=4, max_steps=2, lr=1e-2,
                               routing="mix:rcla:p=0.5|plan:every:2+every:4", eval_every=0, tensorboard=False,
                               quiet=True, device="cpu", cache_dir=str(tmp_path / "cache")))
    tuned = kvroute.load(result.final_checkpoint)
    assert kvroute.get_router(tuned).policy.serves_only() is None and kvroute.get_router(tuned).plan.is_full
    assert is_calibrated(tuned, "every:2") and is_calibrated(tuned, "every:4")
    assert not is_calibrated(tuned, "every:3")


def test_an_interrupted_refinement_leaves_the_closed_form(monkeypatch):
    import importlib

    cal = importlib.import_module("kvroute.calibrate")  # the module (kvroute.calibrate is also the function)
    model = kvroute.apply(tiny_model("llama", layers=4))
    calibrate(model, "every:2", chunks(), FAST, progress=False)
    closed = {k: v.clone() for k, v in model.model.layers[1].self_attn.calibration.named_buffers()}

    def broken(model, plan, train, config, progress=True, teacher=None):
        for maps in cal._plan_maps(model, plan).values():
            maps.value.add_(1.0)  # half-trained
        raise KeyboardInterrupt

    monkeypatch.setattr(cal, "refine", broken)
    with pytest.raises(KeyboardInterrupt):
        calibrate(model, "every:2", chunks(), CalibrationConfig(**{**FAST.__dict__, "steps": 5}), progress=False)
    after = dict(model.model.layers[1].self_attn.calibration.named_buffers())
    assert set(after) == set(closed)
    for name, tensor in after.items():
        torch.testing.assert_close(tensor, closed[name])


def test_teacher_logits_are_kept_once_and_match_a_fresh_pass():
    from kvroute.calibration.fit import TeacherLogits
    from kvroute.precision import autocast

    model = kvroute.apply(tiny_model("llama", layers=4)).eval()
    data = chunks()
    teacher = TeacherLogits(data)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    first = teacher(model, [0, 2], autocast("fp32", "cpu"))
    again = teacher(model, [2, 0, 1], autocast("fp32", "cpu"))
    assert len(calls) == 2  # chunk 1 only on the second call
    torch.testing.assert_close(again[1], first[0])
    with torch.no_grad():
        fresh = model(input_ids=data[[2, 0, 1]]).logits
    torch.testing.assert_close(again, fresh)
    small = TeacherLogits(data, max_bytes=1)  # over the cap: nothing kept, every call recomputes
    small(model, [0], autocast("fp32", "cpu"))
    small(model, [0], autocast("fp32", "cpu"))
    assert len(calls) == 5  # two teacher passes after the fresh one


def test_refinement_with_a_shared_teacher_equals_one_without():
    from kvroute.calibrate import _plan_maps
    from kvroute.calibration.fit import TeacherLogits

    data = chunks()
    config = CalibrationConfig(**{**FAST.__dict__, "query": False, "steps": 5, "lr": 3e-3, "precision": "fp32"})
    maps = []
    for shared in (None, TeacherLogits(data)):
        torch.manual_seed(0)
        model = kvroute.apply(tiny_model("llama", layers=4))
        calibrate(model, "every:2", data, CalibrationConfig(**{**config.__dict__, "steps": 0}), progress=False)
        plan = kvroute.set_plan(model, "every:2")
        refine(model, plan, data, config, progress=False, teacher=shared)
        maps.append({k: m.value.clone() for k, m in _plan_maps(model, plan).items()})
    assert maps[0]
    for k in maps[0]:
        torch.testing.assert_close(maps[0][k], maps[1][k])
