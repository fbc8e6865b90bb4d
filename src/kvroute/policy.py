"""Routing policies: how a route is drawn for each training forward pass.

A route is a tuple ``source[l]``: the layer whose KV layer ``l`` reads in one
forward pass. Each policy is a small dataclass with one method, :meth:`sample`.
All randomness goes through the ``torch.Generator`` passed in, so a seeded run
reproduces its routes step by step.

- ``none``: standard attention, every layer reads its own KV;
- ``rcla(p)``: the paper's R-CLA: each layer l >= 1 keeps its own KV with
  probability p, else reads a layer drawn from the earlier layers of its type
  (``uniform``, as in the paper, or ``nearest``: distance ~ geometric(1/2));
  ``sources=plan`` instead draws a random sharing plan: each layer is an owner
  with probability p and the others read the nearest earlier owner, so every
  training route is one a deployed plan could use;
- ``cla(k)``: fixed groups of k layers, the first layer of each group owns;
- ``rdcla(k, p)``: each layer flips a coin (p) between its CLA@k source and itself;
- ``plan:SPEC``: every pass routes as one deployment plan does (any plan spec:
  ``plan:every:2``, ``plan:layers:0,3,7``...); the model then serves that plan only.
  ``plan:A+B+...`` draws one of several plans per pass, uniformly (``plan:full+every:2+every:4``):
  one model for the plans named, and only those.
- ``mix:A|B|...``: each pass draws one of several policies, then routes as it does; a weight
  before a policy draws it more often (``mix:rcla:p=0.6,sources=plan|plan:every:2+every:4``:
  R-CLA routes on half the passes, the plans you expect to deploy on the other half). The model
  serves any plan when one of the policies does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal, get_args

import torch

from kvroute.plan import SharingPlan

Route = tuple[int, ...]

#: the source draws of :class:`RCLA`.
Sources = Literal["uniform", "nearest", "plan"]
SOURCES = get_args(Sources)

#: joins the plan specs of a policy that trains for several plans (``plan:every:2+every:4``)
PLAN_JOIN = "+"
#: puts a draw weight before a plan of :class:`FixedPlan` (``plan:every:2+3*every:4``) or a policy of
#: :class:`Mixture` (``mix:3*rcla|plan:every:2``)
WEIGHT_MARK = "*"
#: joins the policies of a :class:`Mixture` (``mix:rcla|plan:every:2``)
MIX_JOIN = "|"

#: deeper than any model: the most layers a plan spec is checked against before a model is known.
_MAX_CHECK_LAYERS = 4096


def _earlier_same_type(layer: int, layer_types: tuple[str, ...] | None) -> list[int]:
    if layer_types is None:
        return list(range(layer))
    return [j for j in range(layer) if layer_types[j] == layer_types[layer]]


def _check_p(p: float) -> None:
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"routing p must be in [0, 1] (the probability a layer uses its own KV), got {p}")


@dataclass(frozen=True)
class RoutingPolicy:
    """Base class: draws one route per forward pass."""

    name: ClassVar[str] = ""
    #: whether a layer may read another layer's KV under this policy (False: standard attention)
    routes: ClassVar[bool] = True

    def sample(self, num_layers: int, layer_types: tuple[str, ...] | None, generator: torch.Generator) -> Route:
        """Draw the route for one forward pass.

        Args:
            num_layers: the model's depth.
            layer_types: per-layer attention types when the model mixes them, else None.
            generator: the source of randomness (CPU generator).

        Returns:
            ``source[l]`` for every layer, with ``source[l] <= l`` and of the same type.
        """
        raise NotImplementedError

    @property
    def plans(self) -> tuple[str, ...]:
        """The plan specs a model trained with this policy is fit for; empty when it serves any plan."""
        return ()

    @property
    def drawn_plans(self) -> tuple[str, ...]:
        """The plan specs some passes route exactly as: a calibration of one of them acts in training
        (and is carried from the starting checkpoint). :attr:`plans`, and in a mix its ``plan:`` parts'."""
        return self.plans

    def serves_only(self) -> str | None:
        """The plan spec(s) a model trained with this policy is fit for (several joined by ``+``), or
        None when it serves any plan."""
        return PLAN_JOIN.join(self.plans) or None

    def served_plans(self, num_layers: int, layer_types: tuple[str, ...] | None) -> tuple[SharingPlan, ...]:
        """:attr:`plans` resolved for a model; empty when the policy serves any plan.

        Raises:
            ValueError: naming the routing and the plan spec when a plan does not fit the model,
                or when two of the specs name the same plan for it.
        """
        return self._resolve(self.plans, num_layers, layer_types)

    def resolve_drawn_plans(self, num_layers: int, layer_types: tuple[str, ...] | None) -> tuple[SharingPlan, ...]:
        """:attr:`drawn_plans` resolved for a model (the plans sequence-level unlikelihood rolls out under).

        Raises:
            ValueError: as :meth:`served_plans`.
        """
        return self._resolve(self.drawn_plans, num_layers, layer_types)

    def _resolve(self, specs: tuple[str, ...], num_layers: int,
                 layer_types: tuple[str, ...] | None) -> tuple[SharingPlan, ...]:
        resolved: list[SharingPlan] = []
        for spec in specs:
            try:
                plan = SharingPlan.from_spec(spec, num_layers, layer_types)
            except ValueError as err:
                raise ValueError(f"routing {self.spec!r} does not fit a {num_layers}-layer model: {err}") from None
            twin = next((p for p in resolved if p.source == plan.source), None)
            if twin is not None:
                raise ValueError(f"routing {self.spec!r}: {twin.spec!r} and {spec!r} are the same plan for a "
                                 f"{num_layers}-layer model; name each plan once")
            resolved.append(plan)
        return tuple(resolved)

    def served_plan(self, num_layers: int, layer_types: tuple[str, ...] | None) -> SharingPlan | None:
        """The first of :meth:`served_plans` (a checkpoint's default plan), or None when it serves any plan."""
        plans = self.served_plans(num_layers, layer_types)
        return plans[0] if plans else None

    @property
    def spec(self) -> str:
        """The string form, as the CLI takes it."""
        return self.name

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}


@dataclass(frozen=True)
class NoRouting(RoutingPolicy):
    """Standard attention: every layer reads its own KV."""

    name: ClassVar[str] = "none"
    routes: ClassVar[bool] = False

    def sample(self, num_layers, layer_types, generator) -> Route:
        return tuple(range(num_layers))


@dataclass(frozen=True)
class RCLA(RoutingPolicy):
    """R-CLA: own KV with probability ``p``, else an earlier layer of the same type.

    Args:
        p: probability that a layer uses its own KV.
        sources: ``uniform`` (the paper), ``nearest`` (distance ~ geometric(1/2)) or
            ``plan`` (a random owner set, non-owners read the nearest earlier owner).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> route = RCLA(p=0.5).sample(4, None, g)
        >>> all(s <= l for l, s in enumerate(route))
        True
    """

    name: ClassVar[str] = "rcla"
    p: float = 0.6
    sources: str = "uniform"

    def __post_init__(self) -> None:
        _check_p(self.p)
        if self.sources not in SOURCES:
            raise ValueError(f"rcla sources must be one of {', '.join(map(repr, SOURCES))}, got {self.sources!r}")

    def sample(self, num_layers, layer_types, generator) -> Route:
        coins = torch.rand(num_layers, generator=generator).tolist()
        picks = torch.rand(num_layers, generator=generator).tolist()
        route = []
        for layer in range(num_layers):
            earlier = _earlier_same_type(layer, layer_types)
            if not earlier or coins[layer] < self.p:
                route.append(layer)
                continue
            if self.sources == "plan":  # the owner the previous same-type layer reads (itself if it owns)
                route.append(route[earlier[-1]])
            elif self.sources == "uniform":
                route.append(earlier[min(int(picks[layer] * len(earlier)), len(earlier) - 1)])
            else:  # nearest: P(d-th nearest) proportional to 2^-d
                weights = [0.5 ** (d + 1) for d in range(len(earlier))]
                total, acc, target = sum(weights), 0.0, picks[layer]
                for d, w in enumerate(weights):
                    acc += w / total
                    if target < acc or d == len(weights) - 1:
                        route.append(earlier[-1 - d])
                        break
        return tuple(route)

    @property
    def spec(self) -> str:
        extra = "" if self.sources == "uniform" else f",sources={self.sources}"
        return f"rcla:p={self.p:g}{extra}"


@dataclass(frozen=True)
class CLA(RoutingPolicy):
    """CLA@k: fixed groups of ``k`` layers sharing the first layer's KV."""

    name: ClassVar[str] = "cla"
    k: int = 2

    def __post_init__(self) -> None:
        if int(self.k) <= 0:
            raise ValueError(f"cla:K needs a positive K, got {self.k}")

    def sample(self, num_layers, layer_types, generator) -> Route:
        return SharingPlan.from_spec(f"every:{self.k}", num_layers, layer_types).source

    @property
    def spec(self) -> str:
        return f"cla:{self.k}"


@dataclass(frozen=True)
class RDCLA(RoutingPolicy):
    """RD-CLA@k: each layer flips a coin (own KV with probability ``p``) against its CLA@k source."""

    name: ClassVar[str] = "rdcla"
    k: int = 2
    p: float = 0.6

    def __post_init__(self) -> None:
        if int(self.k) <= 0:
            raise ValueError(f"rdcla:K needs a positive K, got {self.k}")
        _check_p(self.p)

    def sample(self, num_layers, layer_types, generator) -> Route:
        fixed = SharingPlan.from_spec(f"every:{self.k}", num_layers, layer_types).source
        coins = torch.rand(num_layers, generator=generator).tolist()
        return tuple(layer if coins[layer] < self.p else fixed[layer] for layer in range(num_layers))

    @property
    def spec(self) -> str:
        return f"rdcla:{self.k},p={self.p:g}"


@dataclass(frozen=True)
class FixedPlan(RoutingPolicy):
    """Train for the deployment plans you will serve: every pass routes as one of them does.

    Any plan spec works (``every:2``, ``layers:0,3,7``, ``groups:2,3,3``, ``source:...``),
    where ``cla:K`` only covers ``every:K``. Several plans joined by ``+``
    (``full+every:2+every:4``) are drawn uniformly, one per forward pass; a weight before a plan
    (``every:2+3*every:4``) draws it that many times as often as a plan without one. The model
    is then fit for those plans only: :func:`kvroute.set_plan` warns on any other plan, ``full``
    included unless it is named. The first plan is the checkpoint's default.

    Args:
        plan: the plan spec(s) (or a :class:`SharingPlan`, kept as its spec). Checked here as far
            as it goes without a depth; against the model when the policy meets one.

    Example:
        >>> FixedPlan("layers:0,3").sample(5, None, torch.Generator())
        (0, 0, 0, 3, 3)
        >>> FixedPlan("full+every:2").plans
        ('full', 'every:2')
        >>> FixedPlan("every:2+3*every:4").weights
        (1.0, 3.0)
    """

    name: ClassVar[str] = "plan"
    plan: str = "full"

    def __post_init__(self) -> None:
        parts = [part.strip() for part in str(self.plan).split(PLAN_JOIN)]
        object.__setattr__(self, "plan", PLAN_JOIN.join(parts))
        if not any(parts):
            raise ValueError("routing 'plan:': give the plan to train for, e.g. plan:every:2 or plan:layers:0,3,7")
        if not all(parts):
            raise ValueError(f"routing {self.spec!r}: an empty plan between '{PLAN_JOIN}'s; "
                             "name each plan, e.g. plan:full+every:2+every:4")
        specs = [spec for _, spec in self._weighted_plans()]
        if len(set(specs)) != len(specs):
            raise ValueError(f"routing {self.spec!r}: a plan is named twice; name each plan once")
        for spec in specs:
            depth = _depth_of(spec)
            if depth <= _MAX_CHECK_LAYERS:
                try:
                    SharingPlan.from_spec(spec, depth)
                except ValueError as err:
                    raise ValueError(f"routing {self.spec!r}: {err}") from None

    def _weighted_plans(self) -> list[tuple[float, str]]:
        """``every:2+3*every:4`` -> ``[(1.0, "every:2"), (3.0, "every:4")]``; a plan without a weight has 1."""
        return [_weighted(part, self.spec, "PLAN", f"plan:every:2+3{WEIGHT_MARK}every:4")
                for part in self.plan.split(PLAN_JOIN)]

    @property
    def plans(self) -> tuple[str, ...]:
        return tuple(spec for _, spec in self._weighted_plans())

    @property
    def weights(self) -> tuple[float, ...]:
        """How often each of :attr:`plans` is drawn, relative to the others (1 where none is given)."""
        return tuple(weight for weight, _ in self._weighted_plans())

    def sample(self, num_layers, layer_types, generator) -> Route:
        plans = self.served_plans(num_layers, layer_types)
        if len(plans) == 1:  # one plan draws nothing: its runs reproduce without the generator
            return plans[0].source
        return plans[_draw(self.weights, generator)].source

    @property
    def spec(self) -> str:
        return f"plan:{self.plan}"


@dataclass(frozen=True)
class Mixture(RoutingPolicy):
    """Each pass draws one of several policies, then routes as it does.

    ``mix:rcla:p=0.6,sources=plan|plan:every:2+every:4`` trains one model for every plan (the
    R-CLA passes) that sees the plans you expect to deploy more often than R-CLA alone would
    draw them (the ``plan:`` passes). A weight before a policy draws it that many times as
    often as a policy without one (``mix:3*rcla|plan:every:2``). The model serves any plan when
    one of the policies does (``rcla``, ``rdcla``, ``cla``, ``none``); when all are ``plan:``,
    it serves their plans, as one ``plan:A+B`` would.

    Args:
        parts: the policies' specs joined by ``|``, each as :func:`policy_from_spec` takes it.

    Example:
        >>> mix = Mixture("rcla:p=0.5|plan:every:2")
        >>> mix.policies
        (RCLA(p=0.5, sources='uniform'), FixedPlan(plan='every:2'))
        >>> mix.plans  # R-CLA serves any plan
        ()
    """

    name: ClassVar[str] = "mix"
    parts: str = "rcla"

    def __post_init__(self) -> None:
        pieces = [piece.strip() for piece in str(self.parts).split(MIX_JOIN)]
        object.__setattr__(self, "parts", MIX_JOIN.join(pieces))
        if not all(pieces):
            raise ValueError(f"routing {self.spec!r}: an empty policy between '{MIX_JOIN}'s; name each "
                             f"policy, e.g. mix:rcla{MIX_JOIN}plan:every:2")
        specs = [policy.spec for policy in self.policies]
        if len(set(specs)) != len(specs):
            raise ValueError(f"routing {self.spec!r}: a policy is named twice; name each once")

    def _weighted_policies(self) -> list[tuple[float, RoutingPolicy]]:
        out = []
        for piece in self.parts.split(MIX_JOIN):
            head, star, _ = piece.partition(WEIGHT_MARK)
            if star and not _is_number(head):  # a '*' inside the policy (plan:every:2+3*every:4), no weight
                piece = f"1{WEIGHT_MARK}{piece}"
            weight, text = _weighted(piece, self.spec, "POLICY", f"mix:3{WEIGHT_MARK}rcla{MIX_JOIN}plan:every:2")
            if text.partition(":")[0].strip().lower() == Mixture.name:
                raise ValueError(f"routing {self.spec!r}: a mix inside a mix; list its policies in one mix")
            try:
                out.append((weight, policy_from_spec(text)))
            except ValueError as err:
                raise ValueError(f"routing {self.spec!r}: {err}") from None
        return out

    @property
    def policies(self) -> tuple[RoutingPolicy, ...]:
        return tuple(policy for _, policy in self._weighted_policies())

    @property
    def weights(self) -> tuple[float, ...]:
        """How often each of :attr:`policies` is drawn, relative to the others (1 where none is given)."""
        return tuple(weight for weight, _ in self._weighted_policies())

    @property
    def routes(self) -> bool:  # type: ignore[override]
        return any(policy.routes for policy in self.policies)

    @property
    def plans(self) -> tuple[str, ...]:
        served = [policy.plans for policy in self.policies]
        if not all(served):  # one of them serves any plan
            return ()
        return tuple(dict.fromkeys(spec for plans in served for spec in plans))

    @property
    def drawn_plans(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(spec for policy in self.policies for spec in policy.drawn_plans))

    def sample(self, num_layers, layer_types, generator) -> Route:
        weighted = self._weighted_policies()  # parsed once per pass
        _, policy = weighted[_draw(tuple(weight for weight, _ in weighted), generator)]
        return policy.sample(num_layers, layer_types, generator)

    def with_defaults(self, p: float | None, sources: str | None) -> Mixture:
        """The same mix, with ``p`` and ``sources`` (``--p``, ``--sources``) set in each policy that has them."""
        pieces = []
        for weight, policy in self._weighted_policies():
            fields = {} if isinstance(policy, FixedPlan) else dict(asdict(policy))
            if p is not None and "p" in fields:
                fields["p"] = p
            if sources is not None and "sources" in fields:
                fields["sources"] = sources
            policy = type(policy)(**fields) if fields else policy
            pieces.append(policy.spec if weight == 1 else f"{weight:g}{WEIGHT_MARK}{policy.spec}")
        return Mixture(MIX_JOIN.join(pieces))

    @property
    def spec(self) -> str:
        return f"mix:{self.parts}"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _weighted(part: str, owner: str, what: str, example: str) -> tuple[float, str]:
    """``"3*every:4"`` -> ``(3.0, "every:4")``; no weight: 1. Raises naming ``owner`` when the weight is
    not positive and finite or nothing follows it."""
    weight, star, spec = part.partition(WEIGHT_MARK)
    if not star:
        return 1.0, part.strip()
    value = float(weight) if _is_number(weight) else float("nan")
    if not (math.isfinite(value) and value > 0) or not spec.strip():
        raise ValueError(f"routing {owner!r}: {part!r} is not WEIGHT{WEIGHT_MARK}{what} with a positive "
                         f"weight; write e.g. {example}")
    return value, spec.strip()


def _draw(weights: tuple[float, ...], generator: torch.Generator) -> int:
    """The index of one of ``weights``, drawn in proportion to them; uniform weights draw as runs from
    before weights existed did."""
    if len(set(weights)) == 1:
        return int(torch.randint(len(weights), (1,), generator=generator))
    return int(torch.multinomial(torch.tensor(weights), 1, generator=generator))


def _depth_of(spec: str) -> int:
    """The depth a list spec fixes (``source``: its length, ``groups``: their sum, ``layers``: past the
    last owner); 1 for the others or when the list does not parse, so the plan's own error shows."""
    kind, _, arg = spec.partition(":")
    try:
        values = [int(x) for x in arg.split(",") if x.strip()]
    except ValueError:
        return 1
    kind = kind.strip().lower()
    depth = {"source": len(values), "groups": sum(values), "layers": max(values, default=0) + 1}.get(kind, 1)
    return max(1, depth)


_POLICIES: dict[str, type[RoutingPolicy]] = {c.name: c for c in (NoRouting, RCLA, CLA, RDCLA, FixedPlan, Mixture)}


def policy_from_spec(spec: str | RoutingPolicy, p: float | None = None, sources: str | None = None) -> RoutingPolicy:
    """Parse ``none``, ``rcla``, ``cla:K``, ``rdcla:K``, ``plan:SPEC`` or ``mix:A|B|...``.

    Options may follow the spec (``rcla:p=0.6,sources=nearest``, ``rdcla:2,p=0.5``);
    ``p`` and ``sources`` given here override them (in each policy of a mix). After ``plan:``
    the rest is the plan spec, verbatim (``plan:layers:0,3,7``).

    Raises:
        ValueError: for an unknown policy, a bad K, p outside [0, 1], or a bad plan spec.
    """
    if isinstance(spec, RoutingPolicy):
        return spec
    text = spec.strip()
    name, _, rest = text.partition(":")
    name = name.strip().lower()
    if name not in _POLICIES:
        raise ValueError(
            f"routing {text!r}: unknown policy {name!r}; expected one of none, rcla, cla:K, rdcla:K, plan:SPEC, "
            f"mix:A{MIX_JOIN}B"
        )
    if name == FixedPlan.name:  # the plan spec has its own ',' and ':'
        return FixedPlan(rest)
    if name == Mixture.name:
        mix = Mixture(rest)
        return mix if p is None and sources is None else mix.with_defaults(p, sources)
    kwargs: dict[str, Any] = {}
    for item in (x.strip() for x in rest.split(",") if x.strip()):
        key, eq, value = item.partition("=")
        if not eq:
            key, value = ("k" if name in ("cla", "rdcla") else "p"), key
        try:
            kwargs[key.strip()] = value.strip() if key.strip() == "sources" else (
                int(value) if key.strip() == "k" else float(value)
            )
        except ValueError:
            raise ValueError(f"routing {text!r}: bad value {value!r} for {key!r}") from None
    fields = set(_POLICIES[name].__dataclass_fields__)
    if p is not None and "p" in fields:  # --p applies to the policies that have one
        kwargs["p"] = p
    if sources is not None and "sources" in fields:
        kwargs["sources"] = sources
    if name in ("cla", "rdcla") and "k" not in kwargs:
        raise ValueError(f"routing {text!r}: {name} needs a group size, e.g. {name}:2")
    unknown = set(kwargs) - fields
    if unknown:
        raise ValueError(f"routing {text!r}: {name} takes no option(s) {sorted(unknown)}")
    return _POLICIES[name](**kwargs)


def policy_from_dict(data: dict[str, Any]) -> RoutingPolicy:
    """Read back :meth:`RoutingPolicy.to_dict`."""
    data = dict(data)
    name = data.pop("name")
    if name not in _POLICIES:
        raise ValueError(f"unknown routing policy {name!r} in config")
    return _POLICIES[name](**data)
