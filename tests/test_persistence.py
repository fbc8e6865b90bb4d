"""The routing setup travels with checkpoints; plain HF checkpoints still load; plans change in place."""

from __future__ import annotations

import json

import pytest
import torch

import kvroute
from conftest import tiny_model
from kvroute.models import saved_routing
from kvroute.policy import RCLA, RDCLA, NoRouting


def tokens(batch: int, length: int) -> torch.Tensor:
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family_, policy, plan", [
    ("llama", RCLA(0.25, "nearest"), "every:2"),
    ("gemma3_text", RDCLA(2, 0.5), "source:0,0,2,1,3,2"),
])
def test_checkpoint_restores_policy_and_plan(tmp_path, family_, policy, plan):
    model = kvroute.apply(tiny_model(family_, layers=6), policy=policy, plan=plan)
    ids = tokens(2, 9)
    with torch.no_grad():
        before = model(ids).logits
    kvroute.save_checkpoint(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["kvroute"]["plan"] == plan
    assert saved_routing(tmp_path / "ckpt") == config["kvroute"]

    loaded = kvroute.load(tmp_path / "ckpt")
    router = kvroute.get_router(loaded)
    assert router.policy == policy
    assert router.plan.spec == plan and router.plan == kvroute.get_router(model).plan
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, before, atol=1e-5, rtol=1e-4)
    # arguments override the saved setup
    other = kvroute.load(tmp_path / "ckpt", plan="full", policy="none")
    assert kvroute.get_router(other).plan.is_full and kvroute.get_router(other).policy == NoRouting()


def test_plain_hf_checkpoint_loads_as_full_none(tmp_path):
    plain = tiny_model("qwen3")
    plain.save_pretrained(tmp_path / "plain")
    ids = tokens(1, 7)
    with torch.no_grad():
        ref = plain(ids).logits
    model = kvroute.load(tmp_path / "plain")
    router = kvroute.get_router(model)
    assert router.plan.is_full and router.plan.spec == "full"
    assert router.policy == NoRouting()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=1e-4)
    assert saved_routing(tmp_path / "plain") is None
    # the weights saved from a routed model keep the original names: a plain transformers load works
    kvroute.save_checkpoint(model, tmp_path / "routed")
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "routed").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ref, atol=1e-5, rtol=1e-4)


def test_set_plan_changes_plan_without_reloading():
    model = kvroute.apply(tiny_model("mistral", layers=6), plan="full")
    ids = tokens(2, 8)
    weights = model.model.layers[3].self_attn.k_proj.weight
    with torch.no_grad():
        plan = kvroute.set_plan(model, "every:3")
        shared = model(ids).logits
    assert plan.owners == (0, 3) and kvroute.get_router(model).plan is plan
    assert model.config.kvroute["plan"] == "every:3"
    assert model.model.layers[3].self_attn.k_proj.weight is weights
    fresh = kvroute.apply(tiny_model("mistral", layers=6), plan="every:3")
    with torch.no_grad():
        torch.testing.assert_close(shared, fresh(ids).logits, atol=1e-5, rtol=1e-4)
        kvroute.set_plan(model, "full")
        torch.testing.assert_close(model(ids).logits, tiny_model("mistral", layers=6)(ids).logits, atol=1e-5, rtol=1e-4)


def test_routing_config_contents():
    model = kvroute.apply(tiny_model("llama"), policy="rcla:p=0.5", plan="every:2")
    config = kvroute.routing_config(model)
    assert config == {
        "version": 1,
        "policy": {"name": "rcla", "p": 0.5, "sources": "uniform"},
        "plan": "every:2",
        "source": [0, 0, 2, 2],
    }
    json.dumps(config)


def test_unrouted_model_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="not routed"):
        kvroute.get_router(model)
    with pytest.raises(ValueError, match="not routed"):
        kvroute.set_plan(model, "full")


def test_unsupported_checkpoint_lists_families(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=32)).save_pretrained(
        tmp_path / "gpt2"
    )
    with pytest.raises(ValueError, match=r"'gpt2'.*llama, mistral, qwen2, qwen3, gemma3_text"):
        kvroute.load(tmp_path / "gpt2")


def test_bad_saved_plan_is_reported(tmp_path):
    model = kvroute.apply(tiny_model("llama"), plan="every:2")
    kvroute.save_checkpoint(model, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "config.json"
    config = json.loads(path.read_text())
    config["kvroute"]["plan"] = "every:0"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'every:0'"):
        kvroute.load(tmp_path / "ckpt")
