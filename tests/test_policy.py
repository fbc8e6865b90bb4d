"""Routing policies: route validity, R-CLA statistics, seeding, specs."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from conftest import tiny_config
from kvroute.plan import SharingPlan, layer_types_of
from kvroute.policy import CLA, RCLA, RDCLA, FixedPlan, Mixture, NoRouting, policy_from_dict, policy_from_spec
from kvroute.router import Router

S, F = "sliding_attention", "full_attention"
TYPES = (S, S, F, S, S, F, S, S, F)


def _routes(policy, layers, types=None, n=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [policy.sample(layers, types, g) for _ in range(n)]


def _chi_square(counts: list[int]) -> float:
    expected = sum(counts) / len(counts)
    return sum((c - expected) ** 2 / expected for c in counts)


# 99.9% quantiles of the chi-square distribution by degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


@pytest.mark.parametrize("p", [0.25, 0.6, 0.9])
def test_rcla_self_frequency_is_p(p):
    routes = _routes(RCLA(p), 8)
    assert all(r[0] == 0 for r in routes)
    for layer in range(1, 8):
        freq = sum(r[layer] == layer for r in routes) / len(routes)
        assert abs(freq - p) < 0.035, (layer, freq)


def test_rcla_sources_are_uniform():
    routes = _routes(RCLA(0.5), 8, n=6000)
    for layer in range(2, 8):
        counts = Counter(r[layer] for r in routes if r[layer] != layer)
        assert set(counts) == set(range(layer))
        stat = _chi_square([counts[j] for j in range(layer)])
        try:
            from scipy.stats import chi2
        except ImportError:
            threshold = CHI2_999[layer - 1]
        else:
            threshold = chi2.ppf(0.999, layer - 1)
        assert stat < threshold, (layer, dict(counts), stat)


def test_chi_square_rejects_skewed_sources():
    # the check above can fail: the nearest distribution is far from uniform
    routes = _routes(RCLA(0.5, sources="nearest"), 8, n=6000)
    counts = Counter(r[6] for r in routes if r[6] != 6)
    assert _chi_square([counts[j] for j in range(6)]) > CHI2_999[5]


def test_rcla_nearest_favours_near_layers():
    routes = _routes(RCLA(0.0, sources="nearest"), 8)
    counts = Counter(r[7] for r in routes)
    assert 7 not in counts  # p = 0: never itself
    ordered = [counts[j] for j in range(6, -1, -1)]  # nearest first
    assert ordered[:4] == sorted(ordered[:4], reverse=True)
    assert abs(counts[6] / len(routes) - 0.5) < 0.04  # P(nearest) ~ 1/2


def test_rcla_plan_sources_draw_deployable_plans():
    # every route is a sharing plan: owners read themselves, the rest the nearest earlier owner
    routes = _routes(RCLA(0.4, sources="plan"), 8, n=3000)
    for route in routes:
        owners = sorted(set(route))
        assert SharingPlan.from_spec("layers:" + ",".join(map(str, owners)), 8).source == route
    for layer in range(1, 8):  # each layer owns with probability p
        assert abs(sum(r[layer] == layer for r in routes) / len(routes) - 0.4) < 0.035
    # a non-owner reads the nearest earlier owner: P(source = l - d) = 0.4 * 0.6^(d-1) * 0.6
    counts = Counter(r[7] for r in routes)
    assert abs(counts[6] / len(routes) - 0.6 * 0.4) < 0.035
    assert abs(counts[5] / len(routes) - 0.6 * 0.6 * 0.4) < 0.03
    assert len(set(routes)) > 50  # many different plans, not a few fixed ones


def test_typed_rcla_plan_sources_stay_in_type():
    for route in _routes(RCLA(0.0, sources="plan"), len(TYPES), TYPES, n=50):
        # p = 0: only the first layer of each type owns
        assert route == SharingPlan.from_spec("layers:0,2", len(TYPES), TYPES).source


@pytest.mark.parametrize(
    "policy", [RCLA(0.3), RCLA(0.0, sources="nearest"), RCLA(0.5, sources="plan"), CLA(2), CLA(3), RDCLA(2, 0.5),
               NoRouting(), FixedPlan("every:3"), FixedPlan("layers:0,2,4,7")]
)
def test_routes_are_valid_and_never_cross_types(policy):
    for types in (None, TYPES):
        for route in _routes(policy, len(TYPES), types, n=300):
            assert len(route) == len(TYPES)
            for layer, s in enumerate(route):
                assert 0 <= s <= layer
                if types is not None:
                    assert types[s] == types[layer]


def test_typed_rcla_reaches_every_same_type_layer():
    routes = _routes(RCLA(0.0), len(TYPES), TYPES, n=2000)
    assert {r[8] for r in routes} == {2, 5}
    assert {r[7] for r in routes} == {0, 1, 3, 4, 6}
    assert all(r[2] == 2 for r in routes)  # first full layer has no earlier full layer


def test_same_seed_same_routes():
    for policy in (RCLA(0.5), RCLA(0.5, sources="nearest"), RCLA(0.5, sources="plan"), RDCLA(2, 0.5)):
        assert _routes(policy, 8, n=50, seed=7) == _routes(policy, 8, n=50, seed=7)
        assert _routes(policy, 8, n=50, seed=7) != _routes(policy, 8, n=50, seed=8)


def test_router_draws_per_pass_and_resumes():
    plan = SharingPlan.from_spec("every:2", 6)
    router = Router(plan, RCLA(0.5), seed=3)
    first = [router.begin_pass(training=True).route for _ in range(5)]
    assert len(set(first)) > 1  # a new route every pass
    state = router.state_dict()
    after = [router.begin_pass(training=True).route for _ in range(5)]
    again = Router(plan, RCLA(0.5), seed=3)
    assert [again.begin_pass(training=True).route for _ in range(5)] == first
    again.load_state_dict(state)
    assert [again.begin_pass(training=True).route for _ in range(5)] == after
    routing = router.begin_pass(training=False)
    assert routing.route == plan.source
    assert routing.producers == frozenset(plan.owners)


def test_cla_and_rdcla():
    g = torch.Generator().manual_seed(0)
    assert CLA(2).sample(6, None, g) == (0, 0, 2, 2, 4, 4)
    assert CLA(2).sample(5, (S, S, F, S, S), g) == (0, 0, 2, 0, 4)
    assert NoRouting().sample(3, None, g) == (0, 1, 2)
    routes = _routes(RDCLA(2, 0.6), 6)
    for layer in (1, 3, 5):
        values = Counter(r[layer] for r in routes)
        assert set(values) == {layer, layer - 1}
        assert abs(values[layer] / len(routes) - 0.6) < 0.035
    assert all(r[layer] == layer for r in routes for layer in (0, 2, 4))
    assert all(r == (0, 1, 2, 3) for r in _routes(RDCLA(2, 1.0), 4, n=50))
    assert all(r == (0, 0, 2, 2) for r in _routes(RDCLA(2, 0.0), 4, n=50))


@pytest.mark.parametrize(
    "spec, policy",
    [
        ("none", NoRouting()),
        ("rcla", RCLA()),
        ("rcla:0.5", RCLA(0.5)),
        ("rcla:p=0.25,sources=nearest", RCLA(0.25, "nearest")),
        ("cla:2", CLA(2)),
        ("rdcla:4", RDCLA(4)),
        ("rdcla:2,p=0.5", RDCLA(2, 0.5)),
        (" RCLA:p=0.75 ", RCLA(0.75)),
        ("plan:every:2", FixedPlan("every:2")),
        ("plan:layers:0,3,7", FixedPlan("layers:0,3,7")),  # ',' and ':' belong to the plan spec
        (" Plan: groups:2,3,3 ", FixedPlan("groups:2,3,3")),
        ("plan:source:0,0,2,1", FixedPlan("source:0,0,2,1")),
        ("plan:full", FixedPlan("full")),
    ],
)
def test_policy_specs(spec, policy):
    parsed = policy_from_spec(spec)
    assert parsed == policy
    assert policy_from_spec(parsed.spec) == parsed
    assert policy_from_dict(parsed.to_dict()) == parsed


def test_policy_spec_overrides():
    assert policy_from_spec("rcla", p=0.3, sources="nearest") == RCLA(0.3, "nearest")
    assert policy_from_spec("rdcla:2", p=0.1) == RDCLA(2, 0.1)
    assert policy_from_spec("cla:2", p=0.1) == CLA(2)
    assert policy_from_spec("plan:every:2", p=0.1, sources="plan") == FixedPlan("every:2")


@pytest.mark.parametrize(
    "spec, match",
    [
        ("random", "unknown policy 'random'"),
        ("cla", "needs a group size"),
        ("cla:0", "positive K"),
        ("rdcla:-1", "positive K"),
        ("rcla:1.5", r"p must be in \[0, 1\]"),
        ("rcla:p=-0.1", r"p must be in \[0, 1\]"),
        ("rcla:p=abc", "bad value"),
        ("rcla:sources=far", "sources must be"),
        ("cla:2,p=0.5", "takes no option"),
        ("none:3", "takes no option"),
        ("plan", r"routing 'plan:': give the plan to train for"),
        ("plan: ", r"routing 'plan:': give the plan to train for"),
        ("plan:every:0", r"routing 'plan:every:0': plan 'every:0': K must be a positive integer"),
        ("plan:layers:3,5", r"routing 'plan:layers:3,5': .*layer 0 must keep its cache"),
        ("plan:groups:2,x", r"routing 'plan:groups:2,x': .*comma-separated list of group sizes"),
        ("plan:source:0,2,1", r"routing 'plan:source:0,2,1': .*layer 1 reads layer 2"),
        ("plan:keep:1.5", r"routing 'plan:keep:1.5': .*F must be in"),
        ("plan:wide:2", r"routing 'plan:wide:2': .*unknown kind 'wide'"),
        ("plan:p=0.5", r"routing 'plan:p=0.5': .*unknown kind 'p=0.5'"),
    ],
)
def test_bad_policy_spec(spec, match):
    with pytest.raises(ValueError, match=match):
        policy_from_spec(spec)


def test_unknown_policy_in_config():
    with pytest.raises(ValueError, match="unknown routing policy 'xyz'"):
        policy_from_dict({"name": "xyz"})


@pytest.mark.parametrize("spec, route", [
    ("every:2", (0, 0, 2, 2, 4, 4, 6, 6)),
    ("layers:0,3,7", (0, 0, 0, 3, 3, 3, 3, 7)),
    ("groups:2,3,3", (0, 0, 2, 2, 2, 5, 5, 5)),
    ("source:0,0,2,1,4,4,6,6", (0, 0, 2, 0, 4, 4, 6, 6)),  # chains resolve to their owner
    ("keep:0.25", (0, 0, 0, 0, 4, 4, 4, 4)),
    ("full", tuple(range(8))),
])
def test_plan_policy_routes_every_pass_as_its_plan(spec, route):
    policy = policy_from_spec(f"plan:{spec}")
    assert policy.serves_only() == spec
    assert policy.served_plan(8, None).source == route
    assert set(_routes(policy, 8, n=20)) == {route}  # the same route every pass
    router = Router(SharingPlan.from_spec("full", 8), policy, seed=1)
    assert router.begin_pass(training=True).route == route


def test_plan_policy_keeps_attention_types():
    config = tiny_config("gemma3_text", layers=6)  # sliding, sliding, full, sliding, sliding, full
    types = layer_types_of(config)
    g = torch.Generator()
    # the first layer of each type owns; a layer reads the nearest earlier owner of its type
    assert FixedPlan("every:2").sample(6, types, g) == (0, 0, 2, 0, 4, 2)
    assert FixedPlan("layers:0,2,3").sample(6, types, g) == (0, 0, 2, 3, 3, 2)
    assert FixedPlan("layers:0,3").sample(6, None, g) == (0, 0, 0, 3, 3, 3)
    with pytest.raises(ValueError, match=r"routing 'plan:layers:0,3' does not fit a 6-layer model: "
                                         r".*layer 2 is the first 'full_attention' layer"):
        FixedPlan("layers:0,3").sample(6, types, g)
    assert FixedPlan("every:2").sample(6, types, g) == SharingPlan.for_model("every:2", config).source
    with pytest.raises(ValueError, match=r"routing 'plan:source:0,0,1,2,3,4' does not fit a 6-layer model: "
                                         r".*same attention type"):
        FixedPlan("source:0,0,1,2,3,4").sample(6, types, g)  # fine without types: checked only for the model


def test_plan_policy_checks_the_depth_when_it_meets_a_model():
    policy = FixedPlan("groups:2,3,3")  # fits 8 layers only
    assert policy.sample(8, None, torch.Generator()) == (0, 0, 2, 2, 2, 5, 5, 5)
    with pytest.raises(ValueError, match=r"routing 'plan:groups:2,3,3' does not fit a 4-layer model: "
                                         r".*add up to 8"):
        policy.sample(4, None, torch.Generator())
    with pytest.raises(ValueError, match=r"'plan:layers:0,9' does not fit a 4-layer model: .*out of range"):
        FixedPlan("layers:0,9").served_plan(4, None)


def test_only_the_plan_policy_serves_one_plan():
    for policy in (NoRouting(), RCLA(0.5), RCLA(0.5, sources="plan"), CLA(2), RDCLA(2, 0.5)):
        assert policy.serves_only() is None and policy.served_plan(4, None) is None
    assert FixedPlan(SharingPlan.from_spec("every:2", 4)) == FixedPlan("every:2")  # a plan is kept as its spec
    assert FixedPlan("every:2").to_dict() == {"name": "plan", "plan": "every:2"}


def test_a_policy_says_whether_it_routes():
    assert not NoRouting().routes and not policy_from_spec("none").routes
    assert RCLA().routes and CLA(2).routes and policy_from_spec("rdcla:2").routes
    assert policy_from_spec("plan:every:2").routes and isinstance(policy_from_spec("plan:every:2"), FixedPlan)


def test_plan_policy_for_several_plans_draws_each_uniformly():
    policy = policy_from_spec("plan: full + every:2+every:4 ")
    assert policy == FixedPlan("full+every:2+every:4") and policy.plans == ("full", "every:2", "every:4")
    assert policy.spec == "plan:full+every:2+every:4" and policy.serves_only() == "full+every:2+every:4"
    assert policy_from_dict(policy.to_dict()) == policy
    sources = [p.source for p in policy.served_plans(8, None)]
    assert sources == [tuple(range(8)), (0, 0, 2, 2, 4, 4, 6, 6), (0, 0, 0, 0, 4, 4, 4, 4)]
    assert policy.served_plan(8, None).is_full  # the first is the default
    counts = Counter(_routes(policy, 8, n=3000))
    assert set(counts) == set(sources)
    assert _chi_square(list(counts.values())) < CHI2_999[2]
    assert _routes(policy, 8, n=50, seed=3) == _routes(policy, 8, n=50, seed=3)  # seeded
    config = tiny_config("gemma3_text", layers=6)  # each plan keeps the attention types
    types = layer_types_of(config)
    assert set(_routes(FixedPlan("every:2+every:3"), 6, types, n=200)) == {
        SharingPlan.for_model("every:2", config).source, SharingPlan.for_model("every:3", config).source}


def test_plan_policy_draws_weighted_plans_in_proportion():
    policy = policy_from_spec("plan:every:2 + 3*every:4")
    assert policy == FixedPlan("every:2+3*every:4") and policy.spec == "plan:every:2+3*every:4"
    assert policy.plans == ("every:2", "every:4") and policy.weights == (1.0, 3.0)
    assert policy.serves_only() == "every:2+every:4"  # what the checkpoint serves: no weights
    assert policy_from_dict(policy.to_dict()) == policy  # saved with the weights
    assert policy.served_plan(8, None).spec == "every:2"  # the first is still the default
    halves, quarters = (p.source for p in policy.served_plans(8, None))
    counts = Counter(_routes(policy, 8, n=4000))
    assert set(counts) == {halves, quarters}
    expected = {halves: 1000, quarters: 3000}
    assert sum((counts[r] - e) ** 2 / e for r, e in expected.items()) < CHI2_999[1]
    assert _routes(policy, 8, n=50, seed=3) == _routes(policy, 8, n=50, seed=3)  # seeded
    # equal weights draw exactly as unweighted plans do
    assert _routes(FixedPlan("2*every:2+2*every:4"), 8, n=50) == _routes(FixedPlan("every:2+every:4"), 8, n=50)
    assert FixedPlan("0.5*full+every:2").weights == (0.5, 1.0)


@pytest.mark.parametrize("spec, message", [
    ("plan:every:2+", r"routing 'plan:every:2\+': an empty plan between"),
    ("plan:every:2+every:2", r"'plan:every:2\+every:2': a plan is named twice"),
    ("plan:every:2+3*every:2", r"a plan is named twice"),
    ("plan:every:2+0*every:4", r"'0\*every:4' is not WEIGHT\*PLAN with a positive weight"),
    ("plan:every:2+x*every:4", r"'x\*every:4' is not WEIGHT\*PLAN"),
    ("plan:every:2+inf*every:4", r"'inf\*every:4' is not WEIGHT\*PLAN"),
    ("plan:every:2+3*", r"'3\*' is not WEIGHT\*PLAN"),
    ("plan:every:2+every:zz", r"'plan:every:2\+every:zz': plan 'every:zz'"),
])
def test_plan_policy_for_several_plans_rejects_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        policy_from_spec(spec)


def test_plan_policy_names_each_plan_once_for_the_model():
    policy = FixedPlan("full+every:1")  # different specs, one plan
    with pytest.raises(ValueError, match=r"'full' and 'every:1' are the same plan for a 4-layer model"):
        policy.served_plans(4, None)
    with pytest.raises(ValueError, match=r"'plan:every:2\+layers:0,5' does not fit a 4-layer model"):
        FixedPlan("every:2+layers:0,5").sample(4, None, torch.Generator())


def test_mixture_draws_each_policy_in_proportion_then_routes_as_it_does():
    policy = policy_from_spec("mix: rcla:p=0.5,sources=plan | 3*plan:every:2+every:4 ")
    assert policy == Mixture("rcla:p=0.5,sources=plan|3*plan:every:2+every:4")
    assert policy.policies == (RCLA(0.5, "plan"), FixedPlan("every:2+every:4")) and policy.weights == (1.0, 3.0)
    assert policy.routes and policy.plans == () and policy.serves_only() is None  # R-CLA: any plan
    assert policy_from_spec(policy.spec) == policy and policy_from_dict(policy.to_dict()) == policy
    halves, quarters = (SharingPlan.from_spec(s, 8).source for s in ("every:2", "every:4"))
    routes = _routes(policy, 8, n=4000)
    assert _routes(policy, 8, n=50, seed=3) == _routes(policy, 8, n=50, seed=3)  # seeded
    # R-CLA draws either plan exactly with probability 0.5^7 each: nearly all of them come from the plan part
    planned = sum(r in (halves, quarters) for r in routes)
    assert sum((c - e) ** 2 / e for c, e in ((planned, 3000), (4000 - planned, 1000))) < CHI2_999[1]
    assert Counter(r for r in routes if r in (halves, quarters))[halves] > 1300  # the plan part: uniform
    others = [r for r in routes if r not in (halves, quarters)]
    assert len(set(others)) > 50 and all(SharingPlan.from_spec(f"source:{','.join(map(str, r))}", 8) for r in others)


def test_mixture_of_plans_serves_them_and_routes_keep_types():
    policy = Mixture("plan:every:2|2*plan:every:3+every:2|none")
    assert policy.plans == ()  # standard attention serves any plan
    assert Mixture("plan:every:2|plan:every:3+every:2").plans == ("every:2", "every:3")  # their plans, once each
    assert Mixture("plan:every:2|plan:every:4").serves_only() == "every:2+every:4"
    assert Mixture("rcla|plan:every:2+every:4|cla:2").drawn_plans == ("every:2", "every:4")  # their maps act
    assert FixedPlan("every:2+every:4").drawn_plans == ("every:2", "every:4") and RCLA().drawn_plans == ()
    assert not Mixture("none").routes and Mixture("none|cla:2").routes
    config = tiny_config("gemma3_text", layers=6)
    types = layer_types_of(config)
    for route in _routes(Mixture("rcla|cla:2|plan:every:3"), 6, types, n=300):
        assert all(s <= l and types[s] == types[l] for l, s in enumerate(route))


def test_mixture_takes_p_and_sources_into_each_policy_that_has_them():
    assert policy_from_spec("mix:rcla|2*rdcla:2|plan:every:2", p=0.3, sources="plan") == Mixture(
        "rcla:p=0.3,sources=plan|2*rdcla:2,p=0.3|plan:every:2")
    assert policy_from_spec("mix:rcla:p=0.9|cla:2") == Mixture("rcla:p=0.9|cla:2")  # nothing given: as written


@pytest.mark.parametrize("spec, message", [
    ("mix:", r"routing 'mix:': an empty policy"),
    ("mix:rcla||plan:every:2", r"an empty policy between '\|'s"),
    ("mix:0*rcla|plan:full", r"'0\*rcla' is not WEIGHT\*POLICY with a positive weight"),
    ("mix:inf*rcla|plan:full", r"'inf\*rcla' is not WEIGHT\*POLICY"),
    ("mix:2*|plan:full", r"'2\*' is not WEIGHT\*POLICY"),
    ("mix:rcla|rcla", r"a policy is named twice"),
    ("mix:rcla|mix:cla:2", r"a mix inside a mix"),
    ("mix:rcla|x*cla:2", r"'mix:rcla\|x\*cla:2': routing 'x\*cla:2': unknown policy"),
    ("mix:rcla:p=2|cla:2", r"'mix:rcla:p=2\|cla:2': routing p must be in \[0, 1\]"),
    ("mix:rcla|plan:every:0", r"'mix:rcla\|plan:every:0': routing 'plan:every:0': plan 'every:0'"),
])
def test_mixture_rejects_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        policy_from_spec(spec)
