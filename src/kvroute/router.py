"""The router: turns a policy (training) or a plan (inference) into one route per forward pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvroute.plan import SharingPlan
from kvroute.policy import NoRouting, Route, RoutingPolicy


def route_key(route: Route) -> str:
    """The name under which a route's calibration maps are stored (a valid module name)."""
    return "r" + "_".join(map(str, route))


def parse_route_key(key: str) -> Route:
    """The route a :func:`route_key` names."""
    return tuple(int(x) for x in key[1:].split("_"))


@dataclass
class RoutingPass:
    """The routing of one forward pass, handed explicitly to every routed layer.

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
