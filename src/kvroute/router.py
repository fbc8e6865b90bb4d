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
    mode the route is the plan's source map.

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
        self.last_route: Route = plan.source
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

    def enter(self, training: bool) -> RoutingPass:
        """Start a forward pass of the model: route it (:meth:`begin_pass`) and make it current."""
        routing = self.begin_pass(training)
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

    def begin_pass(self, training: bool) -> RoutingPass:
        """Route one forward pass: draw from the policy when training, else use the plan."""
        if training:
            route = self.policy.sample(self.num_layers, self.layer_types, self.generator)
            self.last_route = route
            return RoutingPass(route, frozenset(route), key=route_key(route))
        plan = self.plan
        if self._plan_pass is None or self._plan_pass[0] is not plan:  # once per plan, not per decoded token
            self._plan_pass = (plan, frozenset(plan.source), route_key(plan.source))
        _, producers, key = self._plan_pass
        self.last_route = plan.source
        return RoutingPass(plan.source, producers, key=key)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to draw the same routes."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
