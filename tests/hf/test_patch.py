"""The routing setup travels with checkpoints; plain HF checkpoints still load; plans change in place."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import kvroute
from conftest import record_routes, tiny_model
from kvroute.hf.patch import PlanMismatchWarning
from kvroute.models import saved_routing
from kvroute.policy import RCLA, RDCLA, FixedPlan, Mixture, NoRouting


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


@pytest.fixture
def no_plan_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlanMismatchWarning)
        yield


def test_plan_policy_defaults_to_its_plan_and_warns_off_it(no_plan_warning):
    model = kvroute.apply(tiny_model("llama", layers=6), policy="plan:every:2")
    router = kvroute.get_router(model)
    assert router.policy == FixedPlan("every:2")
    assert router.plan.spec == "every:2" and model.config.kvroute["plan"] == "every:2"
    model.train()
    routes = record_routes(model)
    model(tokens(1, 5))
    assert routes == [(0, 0, 2, 2, 4, 4)]  # training routes as the plan does
    model.eval()
    for plan in ("full", "every:3", "layers:0,3"):
        with pytest.warns(UserWarning, match=rf"fine-tuned for plan 'every:2' only .*under plan '{plan}' it may be "
                                             r"much worse.*full included"):
            assert kvroute.set_plan(model, plan).spec == plan
    assert router.plan.spec == "layers:0,3"  # the warning does not refuse the plan
    kvroute.set_plan(model, "every:2")  # the trained plan, by any spec: silent
    kvroute.set_plan(model, "source:0,0,2,2,4,4")
    kvroute.set_plan(model, "groups:2,2,2")


def test_other_policies_serve_any_plan_silently(no_plan_warning):
    for policy in ("none", "rcla", "cla:2", "rdcla:2"):
        model = kvroute.apply(tiny_model("llama"), policy=policy, plan="full")
        for plan in ("every:2", "every:4", "full"):
            kvroute.set_plan(model, plan)


def test_apply_warns_on_an_explicit_other_plan():
    with pytest.warns(PlanMismatchWarning, match=r"'every:2' only .*plan 'full'"):
        model = kvroute.apply(tiny_model("qwen3"), policy="plan:every:2", plan="full")
    assert kvroute.get_router(model).plan.is_full
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlanMismatchWarning)
        kvroute.apply(model, policy="plan:layers:0,3")  # a new plan policy brings its own plan
    assert kvroute.get_router(model).plan.spec == "layers:0,3"
    with pytest.warns(PlanMismatchWarning, match=r"'layers:0,3' only .*plan 'every:2'"):
        kvroute.apply(model, plan="every:2")  # the saved policy, another plan


def test_plan_policy_checkpoint_restores_silently_and_warns_off_plan(tmp_path, no_plan_warning):
    # Gemma3: the first layer of each type owns, so layers:0,2,4 and every:2 are one plan
    model = kvroute.apply(tiny_model("gemma3_text", layers=6), policy="plan:layers:0,2,4")
    assert kvroute.get_router(model).plan.source == (0, 0, 2, 0, 4, 2)
    kvroute.set_plan(model, "every:2")
    kvroute.save_checkpoint(model, tmp_path / "ckpt")
    assert saved_routing(tmp_path / "ckpt")["policy"] == {"name": "plan", "plan": "layers:0,2,4"}

    loaded = kvroute.load(tmp_path / "ckpt")
    router = kvroute.get_router(loaded)
    assert router.policy == FixedPlan("layers:0,2,4") and router.plan.spec == "every:2"
    kvroute.load(tmp_path / "ckpt", plan="layers:0,2,4")
    with pytest.warns(PlanMismatchWarning, match=r"'layers:0,2,4' only .*plan 'full'"):
        kvroute.load(tmp_path / "ckpt", plan="full")
    with pytest.warns(PlanMismatchWarning, match=r"plan 'every:3'"):
        kvroute.set_plan(loaded, "every:3")
    kvroute.load(tmp_path / "ckpt", plan="full", policy="rcla")  # another policy: any plan


def test_saved_off_plan_warns_on_load(tmp_path):
    with pytest.warns(PlanMismatchWarning):
        model = kvroute.apply(tiny_model("llama"), policy="plan:every:2", plan="every:4")
    kvroute.save_checkpoint(model, tmp_path / "ckpt")
    with pytest.warns(PlanMismatchWarning, match=r"'every:2' only .*plan 'every:4'"):
        loaded = kvroute.load(tmp_path / "ckpt")
    assert kvroute.get_router(loaded).plan.spec == "every:4"  # the saved plan, as chosen


def test_plan_policy_that_does_not_fit_the_model():
    with pytest.raises(ValueError, match=r"routing 'plan:groups:2,3,3' does not fit a 4-layer model: .*add up to 8"):
        kvroute.apply(tiny_model("llama", layers=4), policy="plan:groups:2,3,3")
    model = kvroute.apply(tiny_model("gemma3_text", layers=6), policy="none")
    with pytest.raises(ValueError, match=r"routing 'plan:layers:0,3' does not fit .*first 'full_attention' layer"):
        kvroute.apply(model, policy="plan:layers:0,3")


def test_a_model_trained_for_several_plans_serves_each_and_warns_off_them(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlanMismatchWarning)
        model = kvroute.apply(tiny_model("llama"), policy="plan:every:2+every:4")
        assert kvroute.get_router(model).plan.spec == "every:2"  # the first plan named
        kvroute.set_plan(model, "every:4")
        kvroute.set_plan(model, "groups:2,2")  # every:2 by another name
        kvroute.save_checkpoint(model, tmp_path / "ckpt")
        loaded = kvroute.load(tmp_path / "ckpt")
    assert kvroute.get_router(loaded).plan.spec == "groups:2,2"
    with pytest.warns(PlanMismatchWarning, match=r"plan 'every:2' and 'every:4' only .*plan 'full'"):
        kvroute.set_plan(loaded, "full")


@pytest.mark.parametrize("spec, serves", [("mix:rcla:p=0.5|3*plan:every:2", None),
                                          ("mix:plan:every:2|plan:every:4", "every:2+every:4")])
def test_a_mixed_routing_is_saved_and_serves_what_its_policies_serve(tmp_path, spec, serves):
    model = kvroute.apply(tiny_model("llama"), policy=spec)
    kvroute.save_checkpoint(model, tmp_path / "ckpt")
    loaded = kvroute.load(tmp_path / "ckpt")
    assert kvroute.get_router(loaded).policy == Mixture(spec.removeprefix("mix:"))
    assert kvroute.get_router(loaded).policy.serves_only() == serves
    if serves is None:  # R-CLA in the mix: any plan, no warning
        with warnings.catch_warnings():
            warnings.simplefilter("error", PlanMismatchWarning)
            kvroute.set_plan(loaded, "every:3")
            kvroute.set_plan(loaded, "full")
    else:
        assert kvroute.get_router(loaded).plan.spec == "every:2"
        with pytest.warns(PlanMismatchWarning, match=r"plan 'every:2' and 'every:4' only"):
            kvroute.set_plan(loaded, "full")


def test_weighted_plan_draws_are_saved_and_serve_their_plans(tmp_path):
    model = kvroute.apply(tiny_model("llama"), policy="plan:every:2+3*every:4")
    kvroute.save_checkpoint(model, tmp_path / "ckpt")
    loaded = kvroute.load(tmp_path / "ckpt")
    assert kvroute.get_router(loaded).policy == FixedPlan("every:2+3*every:4")
    assert kvroute.get_router(loaded).plan.spec == "every:2"
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlanMismatchWarning)
        kvroute.set_plan(loaded, "every:4")
    with pytest.warns(PlanMismatchWarning, match=r"plan 'every:2' and 'every:4' only"):
        kvroute.set_plan(loaded, "full")
