"""The router: turns a policy (training) or a plan (inference) into one route per forward pass."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from kvroute.plan import SharingPlan
from kvroute.policy import NoRouting, Route, RoutingPolicy


#: the key under which a checkpoint's config saves its routing setup (policy, plan, source map);
#: read by the transformers adapter and the vLLM plugin alike
CONFIG_KEY = "kvroute"


def route_key(route: Route) -> str:
    """The name under which a route's calibration maps are stored (a valid module name)."""
    return "r" + "_".join(map(str, route))


def parse_route_key(key: str) -> Route:
    """The route a :func:`route_key` names."""
    return tuple(int(x) for x in key[1:].split("_"))


def check_route(route: Route, num_layers: int, layer_types: tuple[str, ...] | None = None) -> Route:
    """``route`` as a tuple of ints, checked: one entry per layer, ``0 <= route[l] <= l``, and a layer
    reads only a layer of its own attention type.

    Unlike a plan's source map, a route is not resolved: ``route[l] == j`` means layer ``l`` reads
    layer ``j``'s own KV, whatever ``j`` reads itself.

    Raises:
        ValueError: naming the first entry that breaks a rule.
    """
    try:
        route = tuple(int(s) for s in route)
    except (TypeError, ValueError):
        raise ValueError(f"a route is a sequence of layer indices, got {route!r}") from None
    if len(route) != num_layers:
        raise ValueError(f"route {route} has {len(route)} entries but the model has {num_layers} layers")
    for layer, s in enumerate(route):
        if not 0 <= s <= layer:
            raise ValueError(f"route {route}: layer {layer} reads layer {s}; a layer can only read itself "
                             "or an earlier layer (0 <= route[l] <= l)")
        if layer_types is not None and layer_types[s] != layer_types[layer]:
            raise ValueError(f"route {route}: layer {layer} ({layer_types[layer]}) cannot read layer {s} "
                             f"({layer_types[s]})")
    return route


@dataclass
class RoutingPass:
    """The routing of one forward pass; every routed layer reads it from the model's :class:`Router`.

    It never travels through forward arguments, so wrappers that copy or rebuild the
    arguments (FSDP2, DDP, ``torch.compile``, PEFT) cannot split it between layers.

    Attributes:
        route: ``route[l]`` is the layer whose KV layer ``l`` reads in this pass.
        producers: layers whose own K/V some layer reads; the others skip their K/V projections.
        kv: filled during the pass: ``kv[j] = (keys, values)`` of producer ``j``, each ``(B, H_kv, T, D)``.
        key: the name of the route's calibration maps, if the layers hold any (``route_key``).
    """

    route: Route
    producers: frozenset[int]
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    key: str = ""


class Router:
    """Holds the routing setup of one model: the training policy, the inference plan, the RNG.

    In training mode each forward pass draws a fresh route from the policy; in eval
    mode the route is the plan's source map. A forward may instead name its route
    (``model(ids, kvroute_route=route)``, see :data:`kvroute.hf.patch.ROUTE_ARG`): the training
    loop draws each step's route with :meth:`sample` and passes it, so it knows the route
    without reading it back, and its self-distillation teacher passes :meth:`identity`.

    It also holds the pass in progress (:meth:`enter` / :meth:`exit`, called by hooks on
    the decoder), so per-pass state lives on the model itself and not in the arguments
    of any forward call. The last pass that ran with gradients stays :attr:`current` after
    it ends: non-reentrant activation checkpointing recomputes its layers in backward.
    Copies and pickles of a router carry its policy, plan, generator and calibration
    record, never a pass in progress.

    Args:
        plan: the inference plan.
        policy: the training policy.
        layer_types: per-layer attention types when the model mixes them.
        seed: seed of the generator that draws training routes.
    """

    def __init__(
        self,
        plan: SharingPlan,
        policy: RoutingPolicy | None = None,
        layer_types: tuple[str, ...] | None = None,
        seed: int = 0,
    ) -> None:
        self.plan = plan
        self.policy = policy or NoRouting()
        self.layer_types = layer_types
        self.generator = torch.Generator().manual_seed(seed)
        self._plan_pass: tuple[SharingPlan, frozenset[int], str] | None = None
        #: route_key -> what was fitted for that plan (kvroute.calibrate); the maps live on the layers
        self.calibration_info: dict[str, dict[str, Any]] = {}
        #: what was recorded about the model's pairwise maps (kvroute.pairs), saved with them
        self.pair_info: dict[str, Any] = {}
        #: how the caches kvroute builds for this model store KV (``kvroute.set_kv_quant``); None: full precision
        self.kv_quant: Any = None
        self._reset_passes()

    def _reset_passes(self) -> None:
        self._local = threading.local()  # .stack: this thread's passes in progress (nested models)
        self._retained: RoutingPass | None = None  # the last pass run with gradients, for backward

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("_local", "_retained", "_plan_pass"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._plan_pass = None
        self._reset_passes()

    @property
    def _stack(self) -> list[RoutingPass]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def enter(self, training: bool, route: Route | None = None) -> RoutingPass:
        """Start a forward pass of the model: route it (:meth:`begin_pass`) and make it current."""
        routing = self.begin_pass(training, route)
        self._stack.append(routing)
        return routing

    def exit(self) -> None:
        """End the current pass. One run with gradients stays current for recomputation in backward."""
        stack = self._stack
        if not stack:
            return
        routing = stack.pop()
        if torch.is_grad_enabled():
            self._retained = routing
        else:
            routing.kv.clear()  # nothing will recompute it; a cache, if any, holds the KV

    @property
    def current(self) -> RoutingPass | None:
        """The pass routed layers read: the innermost in progress on this thread, else the retained one."""
        stack = self._stack
        return stack[-1] if stack else self._retained

    @property
    def num_layers(self) -> int:
        return self.plan.num_layers

    def sample(self) -> Route:
        """Draw the next training route from the policy (advances :attr:`generator`)."""
        return self.policy.sample(self.num_layers, self.layer_types, self.generator)

    def identity(self) -> Route:
        """The route under which every layer reads its own KV (the unrouted model)."""
        return tuple(range(self.num_layers))

    def begin_pass(self, training: bool, route: Route | None = None) -> RoutingPass:
        """Route one forward pass.

        Args:
            training: with no ``route``, draw one from the policy (:meth:`sample`) when training,
                else run the plan's source map.
            route: an explicit route for this pass (checked by :func:`check_route`); the policy
                draws nothing then.

        Returns:
            The pass; its :attr:`RoutingPass.route` is the route the pass runs.
        """
        if route is not None:
            route = check_route(route, self.num_layers, self.layer_types)
            return RoutingPass(route, frozenset(route), key=route_key(route))
        if training:
            route = self.sample()
            return RoutingPass(route, frozenset(route), key=route_key(route))
        plan = self.plan
        if self._plan_pass is None or self._plan_pass[0] is not plan:  # once per plan, not per decoded token
            self._plan_pass = (plan, frozenset(plan.source), route_key(plan.source))
        _, producers, key = self._plan_pass
        return RoutingPass(plan.source, producers, key=key)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to draw the same routes."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
