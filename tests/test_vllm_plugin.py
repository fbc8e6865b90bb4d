"""The vLLM plugin's plan choice and bad-input errors: pure Python, no vLLM needed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from kvroute.cli import main
from kvroute.vllm_plugin import PLAN_KEY, hf_overrides, resolve_plan, routed_architecture, server_command

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
    ckpt = write_checkpoint(tmp_path / "gemma", architectures=["Gemma3ForCausalLM"], model_type="gemma3_text")
    with pytest.raises(ValueError, match=r"does not serve architecture \['Gemma3ForCausalLM'\].*supported: "):
        hf_overrides(ckpt)
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
