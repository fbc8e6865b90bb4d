"""The vLLM plugin's plan choice, calibration folding and bad-input errors: pure Python, no vLLM needed."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import kvroute
from kvroute.calibrate import CALIBRATION_FILE, CalibrationConfig, calibrate, remove_calibration
from kvroute.cli import main
from kvroute.hf.attention import LayerMaps
from kvroute.models import save_checkpoint
from kvroute.plan import SharingPlan
from kvroute.vllm import (
    PLAN_KEY,
    describe_serving,
    fold_query,
    fold_value,
    hf_overrides,
    plan_calibration,
    resolve_plan,
    routed_architecture,
    server_command,
)
from kvroute.vllm import default_kv_cache_memory, kv_pool_report, memory_args

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 8,
    "num_attention_heads": 2, "num_key_value_heads": 1, "hidden_size": 64, "head_dim": 32,
}
ROUTING = {"version": 1, "policy": {"name": "rcla", "p": 0.6, "sources": "uniform"}, "plan": "every:2",
           "source": [0, 0, 2, 2, 4, 4, 6, 6]}


def write_checkpoint(folder: Path, **changes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**CONFIG, **changes}))
    return folder


def test_saved_plan_is_the_default_and_can_be_overridden(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ck", kvroute=ROUTING)
    assert hf_overrides(ckpt) == {"architectures": ["KVRouteLlamaForCausalLM"], PLAN_KEY: "every:2"}
    assert hf_overrides(ckpt, "every:4")[PLAN_KEY] == "every:4"


def test_serve_time_plan_in_the_config_wins(tmp_path):
    plan = resolve_plan({**CONFIG, "kvroute": ROUTING, PLAN_KEY: "groups:3,3,2"})
    assert plan.owners == (0, 3, 6)
    assert plan.source == (0, 0, 0, 3, 3, 3, 6, 6)  # root owners: what vLLM's kv_sharing_target needs


def test_saved_source_map_is_used_without_a_spec():
    plan = resolve_plan({**CONFIG, "kvroute": {"version": 1, "source": [0, 0, 0, 0, 4, 4, 4, 4]}})
    assert plan.owners == (0, 4)


def test_checkpoint_without_routing_config_serves_full_with_a_warning(tmp_path):
    ckpt = write_checkpoint(tmp_path / "plain")
    with pytest.warns(UserWarning, match="no kvroute routing config.*'full'"):
        overrides = hf_overrides(ckpt)
    assert overrides[PLAN_KEY] == "full"


@pytest.mark.parametrize("plan", ["groups:3,3", "layers:1,4", "every:0", "source:0,1"])
def test_plan_that_does_not_fit_is_a_clear_error(tmp_path, plan):
    ckpt = write_checkpoint(tmp_path / "ck", kvroute=ROUTING)
    with pytest.raises(ValueError, match="does not fit this 8-layer model"):
        hf_overrides(ckpt, plan)


def test_unsupported_family_is_a_clear_error(tmp_path):
    ckpt = write_checkpoint(tmp_path / "phi", architectures=["Phi3ForCausalLM"], model_type="phi3")
    with pytest.raises(ValueError, match=r"does not serve architecture \['Phi3ForCausalLM'\].*supported: "):
        hf_overrides(ckpt)
    assert routed_architecture({"architectures": ["Gemma3ForCausalLM"]}) == "KVRouteGemma3ForCausalLM"
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        routed_architecture({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        hf_overrides(tmp_path / "nothing")


def test_server_command_launches_vllms_openai_server(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ck", kvroute=ROUTING)
    cmd = server_command(ckpt, plan="every:4", port=8123, extra_args=["--max-model-len", "128"], python="py")
    assert cmd[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--port") + 1] == "8123"
    assert json.loads(cmd[cmd.index("--hf-overrides") + 1]) == {
        "architectures": ["KVRouteLlamaForCausalLM"], PLAN_KEY: "every:4",
    }
    assert cmd[-2:] == ["--max-model-len", "128"]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_serve_without_vllm_says_how_to_get_it(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "ck", kvroute=ROUTING)
    assert main(["serve", str(ckpt), "--plan", "every:4"]) == 2
    assert "vLLM is not installed" in capsys.readouterr().err


def test_serve_rejects_a_bad_plan_before_starting(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "ck", kvroute=ROUTING)
    assert main(["serve", str(ckpt), "--plan", "groups:3,3", "--dry-run"]) == 2
    assert "does not fit this 8-layer model" in capsys.readouterr().err


def test_qwen_with_mixed_sliding_windows_is_a_clear_error_before_vllm_starts(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ck", architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                            layer_types=["full_attention"] * 4 + ["sliding_attention"] * 4, sliding_window=16)
    with pytest.raises(ValueError, match="sliding window on every layer or on none"):
        hf_overrides(ckpt, "every:2")
    all_sliding = write_checkpoint(tmp_path / "all", architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                                   layer_types=["sliding_attention"] * 8, sliding_window=16)
    assert hf_overrides(all_sliding, "every:2")[PLAN_KEY] == "every:2"


def test_default_kv_pool_fits_the_free_memory_on_cpu():
    gib = 2**30
    assert default_kv_cache_memory(on_cpu=True, available=16 * gib) == 4 * gib  # a quarter of what is free
    assert default_kv_cache_memory(on_cpu=True, available=512 * 2**20) == 256 * 2**20  # at least 256 MiB
    assert default_kv_cache_memory(on_cpu=True, available=512 * gib) == 8 * gib  # at most 8 GiB
    assert default_kv_cache_memory(on_cpu=False, available=16 * gib) is None  # GPU: vLLM's own sizing


def test_memory_flag_goes_to_vllm_unless_its_own_flags_size_the_pool(tmp_path):
    assert memory_args(2**30) == ["--kv-cache-memory-bytes", str(2**30)]
    assert memory_args(None) == []
    assert memory_args(2**30, ["--gpu-memory-utilization", "0.5"]) == []
    assert memory_args(2**30, ["--kv-cache-memory-bytes=1000"]) == []
    ckpt = write_checkpoint(tmp_path / "ck", kvroute=ROUTING)
    cmd = server_command(ckpt, plan="every:4", python="py", kv_cache_memory=3 * 2**30)
    assert cmd[cmd.index("--kv-cache-memory-bytes") + 1] == str(3 * 2**30)


def test_kv_pool_report_counts_tokens_under_the_plan_and_full(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ck", kvroute=ROUTING, torch_dtype="float32")
    per_layer_token = 2 * 1 * 32 * 2  # K and V, 1 KV head of 32 dims, served in bf16 (vLLM's auto for fp32)
    report = kv_pool_report(ckpt, "every:4", 2**20)
    assert f"about {2**20 // (per_layer_token * 2):,} tokens under every:4" in report
    assert f"against {2**20 // (per_layer_token * 8):,} under full (4.00x)" in report and "(bfloat16)" in report
    assert "(float32)" in kv_pool_report(ckpt, "every:4", 2**20, dtype="float32")


def test_serve_reports_the_kv_pool_and_reads_its_size(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "ck", kvroute=ROUTING)
    rc = 0 if importlib.util.find_spec("vllm") is not None else 2  # the report comes first either way
    assert main(["serve", str(ckpt), "--plan", "every:2", "--kv-cache-memory", "64MiB", "--dry-run"]) == rc
    err = capsys.readouterr().err
    assert "KV pool 64.00 MiB (bfloat16): about 131,072 tokens under every:2 against 65,536 under full (2.00x)" in err
    assert main(["serve", str(ckpt), "--kv-cache-memory", "lots", "--dry-run"]) == 2
    assert "cannot read memory size 'lots'" in capsys.readouterr().err
    assert main(["serve", str(ckpt), "--kv-cache-memory", "0MiB", "--dry-run"]) == 2
    assert "--kv-cache-memory must be positive" in capsys.readouterr().err


# ----------------------------------------------------------------- calibration
def random_maps(heads: int, dim: int, seed: int = 0) -> LayerMaps:
    g = torch.Generator().manual_seed(seed)
    return LayerMaps(torch.randn(heads, dim // 2, 2, generator=g), torch.randn(heads, dim, dim, generator=g) / dim**0.5)


def test_folded_projections_equal_the_maps_at_run_time():
    heads, dim, hidden = 3, 8, 16
    torch.manual_seed(0)
    q_proj, o_proj = torch.nn.Linear(hidden, heads * dim, bias=True), torch.nn.Linear(heads * dim, hidden, bias=True)
    maps = random_maps(heads, dim)
    x = torch.randn(2, 5, hidden)  # (B, T, hidden)
    folded_q = torch.nn.Linear(hidden, heads * dim, bias=True)
    folded_o = torch.nn.Linear(heads * dim, hidden, bias=True)
    with torch.no_grad():
        folded_q.weight.copy_(fold_query(q_proj.weight, maps.query))
        folded_q.bias.copy_(fold_query(q_proj.bias, maps.query))
        folded_o.weight.copy_(fold_value(o_proj.weight, maps.value))
        folded_o.bias.copy_(o_proj.bias)
        expected_q = maps.map_query(q_proj(x).unflatten(-1, (heads, dim)).transpose(1, 2))  # (B, H, T, D)
        torch.testing.assert_close(folded_q(x).unflatten(-1, (heads, dim)).transpose(1, 2), expected_q)
        out = torch.randn(2, 5, heads, dim)  # (B, T, H, D): attention output per head
        torch.testing.assert_close(folded_o(out.flatten(-2)), o_proj(maps.map_output(out).flatten(-2)))
        assert not torch.allclose(folded_o(out.flatten(-2)), o_proj(out.flatten(-2)))  # the maps do something


FAST = CalibrationConfig(tokens=1024, chunk_tokens=32, val_fraction=0.25, batch_size=8)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> Path:
    """A tiny Llama checkpoint with an every:2 calibration (query and value maps)."""
    model = kvroute.apply(tiny_model("llama", layers=4), plan="every:2")
    chunks = torch.randint(3, 97, (24, 32), generator=torch.Generator().manual_seed(0))
    calibrate(model, "every:2", chunks, FAST, progress=False)
    return save_checkpoint(model, tmp_path_factory.mktemp("calibrated") / "ckpt")


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_weights_folded_at_load_equal_the_calibration_at_run_time(calibrated):
    model = kvroute.load(calibrated, plan="every:2")  # HF path: maps applied at run time
    ids = torch.randint(3, 97, (2, 20), generator=torch.Generator().manual_seed(7))
    expected = logits(model, ids)
    plan = SharingPlan.for_model("every:2", model.config)
    calibration = plan_calibration(calibrated, model.config, plan)
    assert sorted(calibration.maps) == [1, 3] and calibration.has_query_maps
    weights = load_file(str(calibrated / "model.safetensors"))
    folded = dict(calibration.fold(weights.items(), queries=True))
    changed = {k for k in weights if not torch.equal(folded[k], weights[k])}
    assert changed == {f"model.layers.{l}.self_attn.{p}.weight" for l in (1, 3) for p in ("q_proj", "o_proj")}
    twin = copy.deepcopy(model)
    remove_calibration(twin)
    uncalibrated = logits(twin, ids)
    twin.load_state_dict(folded, strict=False)
    torch.testing.assert_close(logits(twin, ids), expected, atol=1e-5, rtol=1e-4)
    assert (uncalibrated - expected).abs().max() > 1e-3  # so the fold is what matches


def test_plan_calibration_is_found_per_plan_and_checked(calibrated, tmp_path):
    config = json.loads((calibrated / "config.json").read_text())
    assert plan_calibration(calibrated, config, resolve_plan(config, "every:4")) is None
    assert plan_calibration(calibrated, config, resolve_plan(config, "full")) is None
    assert plan_calibration(tmp_path / "no-such-folder", config, resolve_plan(config, "every:2")) is None
    assert describe_serving(calibrated).endswith(
        "owners [0,2]; calibrated, 2 layers mapped, value maps folded into o_proj, query maps"
    )
    assert describe_serving(calibrated, "every:4").endswith("; not calibrated")
    deeper = shutil.copytree(calibrated, tmp_path / "deeper")
    (deeper / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 6}))
    with pytest.raises(ValueError, match="fitted for another model: num_layers 4 != 6"):
        hf_overrides(deeper, "every:3")  # whichever plan: the file does not fit the model


def test_describe_serving_warns_off_a_plan_targeted_models_plans(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    policy = {"name": "plan", "plan": "every:2+every:4"}
    (folder / "config.json").write_text(json.dumps({**CONFIG, "kvroute": {**ROUTING, "policy": policy}}))
    assert "WARNING" not in describe_serving(folder) and "WARNING" not in describe_serving(folder, "every:4")
    assert describe_serving(folder, "full").endswith(
        "; WARNING: fine-tuned for plan 'every:2' and 'every:4' only, expect it to be much worse under 'full'")
    (folder / "config.json").write_text(json.dumps({**CONFIG, "kvroute": ROUTING}))  # rcla: any plan
    assert "WARNING" not in describe_serving(folder, "every:3")


def test_fold_rejects_other_weights_and_missing_weights(calibrated):
    config = json.loads((calibrated / "config.json").read_text())
    calibration = plan_calibration(calibrated, config, resolve_plan(config, "every:2"))
    weights = load_file(str(calibrated / "model.safetensors"))
    other = {**weights, "model.layers.2.self_attn.o_proj.weight": 2 * weights["model.layers.2.self_attn.o_proj.weight"]}
    with pytest.raises(ValueError, match="fitted for a model with other weights"):
        list(calibration.fold(other.items(), queries=True))
    missing = {k: v for k, v in weights.items() if k != "model.layers.3.self_attn.q_proj.weight"}
    with pytest.raises(ValueError, match=r"no checkpoint weight to fold .*layers\.3\.self_attn\.q_proj"):
        list(calibration.fold(missing.items(), queries=True))
    list(calibration.fold(missing.items(), queries=False))  # query maps applied at run time: no q_proj needed


def test_calibration_with_maps_on_an_owner_layer_is_an_error(calibrated, tmp_path):
    folder = shutil.copytree(calibrated, tmp_path / "ckpt")
    with safe_open(str(folder / CALIBRATION_FILE), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k.replace(".3.", ".2."): v for k, v in tensors.items()}  # layer 2 keeps its KV under every:2
    save_file(tensors, str(folder / CALIBRATION_FILE), metadata=meta)
    with pytest.raises(ValueError, match="has maps for layer 2, which keeps its own KV"):
        hf_overrides(folder)


def test_serve_reports_whether_the_plan_is_calibrated(calibrated, capsys):
    rc = 0 if importlib.util.find_spec("vllm") is not None else 2  # the report comes first either way
    assert main(["serve", str(calibrated), "--dry-run"]) == rc
    err = capsys.readouterr().err
    assert "with plan every:2: 2/4 layers keep KV" in err and "; calibrated, 2 layers mapped" in err
    assert main(["serve", str(calibrated), "--plan", "every:4", "--dry-run"]) == rc
    assert "plan every:4: 1/4 layers keep KV (25.0%), owners [0]; not calibrated" in capsys.readouterr().err


def test_every_routed_architecture_names_a_model_class_that_exists():
    """register() hands vLLM ``module:class`` strings it imports only when serving: check them here."""
    from kvroute.vllm.config import ROUTED_ARCHITECTURES
    from kvroute.vllm.plugin import MODEL_CLASSES

    assert set(MODEL_CLASSES) == set(ROUTED_ARCHITECTURES.values())
    for routed, target in MODEL_CLASSES.items():
        module, name = target.split(":")
        assert name == routed
        spec = importlib.util.find_spec(module)
        assert spec is not None and f"\nclass {name}(" in Path(spec.origin).read_text(), target


def test_the_old_plugin_module_still_registers():
    """Environments installed before the move name ``kvroute.vllm_plugin:register`` as their entry point."""
    import kvroute.vllm
    import kvroute.vllm_plugin

    assert kvroute.vllm_plugin.register is kvroute.vllm.register
    assert kvroute.vllm_plugin.server_command is kvroute.vllm.server_command
