"""The router on its own (routes per pass, explicit routes, the pass stack, copies) and the explicit
route of a forward (``kvroute_route``) through a routed model and wrappers around it."""

from __future__ import annotations

import copy
import pickle
import threading
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import kvroute
from conftest import record_routes, tiny_model
from kvroute.hf.patch import ROUTE_ARG
from kvroute.plan import SharingPlan
from kvroute.policy import CLA, RCLA, RoutingPolicy
from kvroute.router import Router, check_route, parse_route_key, route_key

GEMMA_TYPES = ("sliding_attention", "sliding_attention", "full_attention") * 2


def ids(batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 90, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_route_key_round_trips():
    for route in [(0,), (0, 0, 2, 2), (0, 1, 1, 3, 10, 10, 10, 10, 10, 10, 10)]:
        key = route_key(route)
        assert key.isidentifier() and parse_route_key(key) == route
    assert route_key((0, 0, 2)) != route_key((0, 0, 0))


def test_check_route_accepts_chains_and_names_the_bad_entry():
    assert check_route([0, 0, 1, 3], 4) == (0, 0, 1, 3)  # not resolved: layer 2 reads layer 1's own KV
    assert check_route((torch.tensor(0), 0), 2) == (0, 0)
    with pytest.raises(ValueError, match="3 entries but the model has 4 layers"):
        check_route((0, 0, 1), 4)
    with pytest.raises(ValueError, match="layer 2 reads layer 3"):
        check_route((0, 0, 3, 3), 4)
    with pytest.raises(ValueError, match="layer 0 reads layer -1"):
        check_route((-1, 0), 2)
    with pytest.raises(ValueError, match=r"layer 2 \(full_attention\) cannot read layer 1 \(sliding_attention\)"):
        check_route((0, 0, 1, 3, 3, 5), 6, GEMMA_TYPES)
    with pytest.raises(ValueError, match="sequence of layer indices"):
        check_route("abc", 3)


def test_training_passes_draw_from_the_policy_and_eval_passes_run_the_plan():
    plan = SharingPlan.from_spec("every:2", 6)
    router = Router(plan, RCLA(0.5), seed=7)
    reference = torch.Generator().manual_seed(7)
    drawn = [router.begin_pass(training=True).route for _ in range(6)]
    assert drawn == [RCLA(0.5).sample(6, None, reference) for _ in range(6)]
    assert len(set(drawn)) > 1
    eval_pass = router.begin_pass(training=False)
    assert eval_pass.route == plan.source and eval_pass.producers == frozenset(plan.owners)
    assert eval_pass.key == route_key(plan.source) and eval_pass.kv == {}
    # sample() is the same draw begin_pass makes, from the same generator
    twin = Router(plan, RCLA(0.5), seed=7)
    assert [twin.sample() for _ in range(6)] == drawn


def test_eval_passes_follow_a_new_plan():
    router = Router(SharingPlan.from_spec("every:2", 6))
    first = router.begin_pass(training=False)
    assert router.begin_pass(training=False).producers is first.producers  # worked out once per plan
    router.plan = SharingPlan.from_spec("every:3", 6)
    assert router.begin_pass(training=False).route == (0, 0, 0, 3, 3, 3)


def test_an_explicit_route_draws_nothing():
    router = Router(SharingPlan.from_spec("full", 4), CLA(2), seed=0)
    router.policy = RCLA(0.5)
    state = router.generator.get_state()
    for training in (True, False):
        routing = router.begin_pass(training, route=[0, 0, 1, 3])
        assert routing.route == (0, 0, 1, 3) and routing.producers == {0, 1, 3}
        assert routing.key == route_key((0, 0, 1, 3))
    assert torch.equal(router.generator.get_state(), state)
    assert router.identity() == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="layer 1 reads layer 2"):
        router.begin_pass(True, route=(0, 2, 2, 3))


def test_the_pass_stack():
    router = Router(SharingPlan.from_spec("every:2", 4), RCLA(0.5))
    assert router.current is None
    router.exit()  # nothing in progress: nothing to end
    outer = router.enter(training=False)
    inner = router.enter(training=True, route=(0, 0, 2, 2))
    assert router.current is inner
    with torch.no_grad():
        inner.kv[0] = (torch.zeros(1), torch.zeros(1))
        router.exit()
        assert router.current is outer and inner.kv == {}  # a pass without gradients keeps no KV
        router.exit()
    assert router.current is None  # and is not retained
    with torch.enable_grad():
        kept = router.enter(training=True)
        router.exit()
    assert router.current is kept  # a pass with gradients stays for recomputation in backward
    assert router.enter(training=False) is router.current  # a new pass comes first
    router.exit()


def test_passes_are_per_thread():
    router = Router(SharingPlan.from_spec("every:2", 4))
    mine = router.enter(training=False)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(router.current))
    thread.start()
    thread.join()
    assert seen == [None] and router.current is mine
    router.exit()


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_carry_the_setup_not_the_passes(how):
    router = Router(SharingPlan.from_spec("every:2", 6), RCLA(0.5), seed=3)
    router.sample()
    router.calibration_info["r0_0"] = {"tokens": 5}
    with torch.enable_grad():
        router.enter(training=True)
        router.enter(training=True)
        router.exit()
    twin = copy.deepcopy(router) if how == "deepcopy" else pickle.loads(pickle.dumps(router))
    assert twin.current is None and router.current is not None
    assert twin.plan == router.plan and twin.policy == router.policy
    assert twin.calibration_info == router.calibration_info
    assert [twin.sample() for _ in range(4)] == [router.sample() for _ in range(4)]
    router.exit()


def test_state_dict_resumes_the_draws():
    router = Router(SharingPlan.from_spec("full", 6), RCLA(0.5), seed=1)
    router.sample()
    state = router.state_dict()
    after = [router.sample() for _ in range(4)]
    fresh = Router(SharingPlan.from_spec("full", 6), RCLA(0.5), seed=99)
    fresh.load_state_dict(state)
    assert [fresh.sample() for _ in range(4)] == after


# ------------------------------------------------------------ the explicit route of a forward
class _Wrapper(nn.Module):
    """A wrapper that rebuilds its keyword arguments, as DDP, FSDP and PEFT do."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **copy.deepcopy(kwargs))


def test_an_explicit_route_runs_like_a_policy_that_draws_it():
    model = kvroute.apply(tiny_model("llama", layers=4), policy="rcla:p=0.5", seed=4).train()
    router = kvroute.get_router(model)
    routes = record_routes(model)
    x = ids()
    with torch.no_grad():
        for route in [(0, 0, 1, 3), (0, 0, 0, 0), (0, 1, 2, 3)]:
            state = router.generator.get_state()
            explicit = model(x, use_cache=False, **{ROUTE_ARG: route}).logits
            assert routes[-1] == route and torch.equal(router.generator.get_state(), state)  # nothing drawn
            kvroute.apply(model, policy=_Fixed(route))
            torch.testing.assert_close(model(x, use_cache=False).logits, explicit)
            kvroute.apply(model, policy="rcla:p=0.5")


@dataclass(frozen=True)
class _Fixed(RoutingPolicy):
    """Always draws ``route``."""

    route: tuple[int, ...] = ()

    def sample(self, num_layers, layer_types, generator):
        return self.route


@pytest.mark.parametrize("wrap", ["deepcopy", "wrapper", "both"])
def test_an_explicit_route_reaches_the_model_through_copies_and_wrappers(wrap):
    model = kvroute.apply(tiny_model("llama", layers=4), policy="rcla:p=0.5", plan="every:2", seed=2)
    x = ids()
    with torch.no_grad():
        reference = model.train()(x, use_cache=False, **{ROUTE_ARG: (0, 0, 2, 0)}).logits
        other = copy.deepcopy(model) if wrap in ("deepcopy", "both") else model
        if wrap in ("wrapper", "both"):
            other = _Wrapper(other)
        routes = record_routes(other.inner if isinstance(other, _Wrapper) else other)
        out = other.train()(x, use_cache=False, **{ROUTE_ARG: [0, 0, 2, 0]}).logits
    assert routes == [(0, 0, 2, 0)]
    torch.testing.assert_close(out, reference)


def test_the_identity_route_in_training_is_the_unrouted_model():
    """What the self-distillation teacher runs: no dropout in the tiny model, so it equals eval under full."""
    model = kvroute.apply(tiny_model("gemma3_text", layers=6), policy="rcla:p=0.0", plan="every:3")
    x = ids()
    with torch.no_grad():
        kvroute.set_plan(model, "full")
        full = model.eval()(x, use_cache=False).logits
        kvroute.set_plan(model, "every:3")
        model.train()
        teacher = model(x, use_cache=False, **{ROUTE_ARG: kvroute.get_router(model).identity()}).logits
        student = model(x, use_cache=False).logits
    torch.testing.assert_close(teacher, full)
    assert (student - full).abs().max() > 1e-3


def test_an_explicit_route_in_eval_mode():
    model = kvroute.apply(tiny_model("llama", layers=4), plan="every:2")
    x = ids()
    with torch.no_grad():
        shared = model(x, use_cache=False).logits
        torch.testing.assert_close(model(x, **{ROUTE_ARG: (0, 0, 2, 2)}).logits, shared)  # the plan's own: cached
        full = model(x, use_cache=False, **{ROUTE_ARG: (0, 1, 2, 3)}).logits
        kvroute.set_plan(model, "full")
        torch.testing.assert_close(model(x, use_cache=False).logits, full)
        kvroute.set_plan(model, "every:2")
        with pytest.raises(ValueError, match="runs without a cache"):
            model(x, **{ROUTE_ARG: (0, 1, 2, 3)})
        with pytest.raises(ValueError, match="layer 3 reads layer 4"):
            model(x, use_cache=False, **{ROUTE_ARG: (0, 1, 2, 4)})
        assert kvroute.get_router(model).current is None  # a refused pass leaves nothing behind
        torch.testing.assert_close(model(x, use_cache=False).logits, shared)
