"""Sharing plans: which layer reads which layer's KV at inference time.

A plan is one immutable, validated value. ``source[l]`` is the layer whose KV
layer ``l`` reads; owners are the layers with ``source[l] == l``. Plans are built
from string specs that mean the same thing everywhere (Python, CLI, configs,
result files):

- ``full``: every layer owns its KV;
- ``every:K``: owners 0, K, 2K, ...;
- ``keep:F``: a fraction F of the layers, evenly spaced, layer 0 included;
- ``layers:0,3,7``: explicit owners;
- ``groups:2,3,3``: consecutive groups, the first layer of each group owns;
- ``source:0,0,2,2``: an explicit source map (chains resolve to their owner).

A non-owner reads the nearest earlier owner (the paper's mu(l)). In models that
mix attention types (Gemma3's sliding and global layers) a layer only reads an
earlier layer of its own type, so the first layer of each type always owns.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from kvroute.dtypes import dtype_bytes  # noqa: F401  (re-exported: plan.dtype_bytes is public)


@dataclass(frozen=True)
class KVShape:
    """What the KV-cache size of a model depends on.

    Args:
        num_layers: decoder layers.
        kv_heads: key/value heads per layer.
        head_dim: size of one head.
        layer_types: per-layer attention type, or None when all layers are alike.
        sliding_window: window of ``sliding_attention`` layers, if any.
        uniform_sliding: every layer slides (a global window, as Mistral's, or all types sliding).
    """

    num_layers: int
    kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...] | None = None
    sliding_window: int | None = None
    uniform_sliding: bool = False

    def slides(self, layer: int) -> bool:
        """Whether ``layer`` attends within a sliding window (its cache holds at most the window)."""
        if not self.sliding_window:
            return False
        return self.uniform_sliding or (self.layer_types is not None and self.layer_types[layer] == "sliding_attention")

    def token_bytes(self, dtype: Any = "bf16", kv_quant: Any = None) -> int:
        """KV bytes one token costs in one layer's cache (keys and values); with ``kv_quant``
        (``"int8"``, ``"int4"``), a token past the full-precision residual window, scales included."""
        from kvroute.kvquant import KVQuant

        quant = KVQuant.parse(kv_quant)
        entry = quant.entry_bytes(self.head_dim) if quant else self.head_dim * dtype_bytes(dtype)
        return 2 * self.kv_heads * entry

    def layer_bytes(self, layer: int, tokens: int, batch: int = 1, dtype: Any = "bf16", kv_quant: Any = None) -> int:
        """KV bytes ``layer`` holds for ``batch`` sequences of ``tokens`` tokens when it owns a cache.

        A sliding-window layer holds at most ``sliding_window - 1`` tokens, as the transformers
        cache keeps them. With ``kv_quant``, another layer holds its newest ``residual`` tokens in
        ``dtype`` and the older ones quantized, scales included.
        """
        from kvroute.kvquant import KVQuant

        quant = KVQuant.parse(kv_quant)
        if self.slides(layer):
            return min(tokens, self.sliding_window - 1) * self.token_bytes(dtype) * batch
        if quant is not None:
            full, quantized = quant.split(tokens)
            return (full * self.token_bytes(dtype) + quantized * self.token_bytes(dtype, quant)) * batch
        return tokens * self.token_bytes(dtype) * batch

    @classmethod
    def from_config(cls, config: Any) -> KVShape:
        """Read the shape from a transformers config (or anything with the same fields)."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config(decoder=True)
        layers = config.num_hidden_layers
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        window = getattr(config, "sliding_window", None)
        types = getattr(config, "layer_types", None)
        # every layer slides: a global window (Mistral: no layer types) or all types sliding (Qwen2)
        uniform = bool(window) and (all(t == "sliding_attention" for t in types) if types else True)
        return cls(layers, kv_heads, head_dim, layer_types_of(config), window, uniform)


def layer_types_of(config: Any) -> tuple[str, ...] | None:
    """Per-layer attention types when a model mixes them, else None."""
    types = getattr(config, "layer_types", None)
    if not types or len(set(types)) < 2:
        return None
    return tuple(types[: config.num_hidden_layers])


@dataclass(frozen=True)
class SharingPlan:
    """A validated depth-wise sharing plan.

    Build one with :meth:`from_spec` (or :meth:`for_model`); the constructor takes
    an explicit source map and resolves chains to their owner.

    Args:
        source: ``source[l]`` is the layer whose KV layer ``l`` reads.
        spec: the spec string the plan was built from (kept for printing).
        layer_types: per-layer attention types, when the model mixes them.

    Example:
        >>> plan = SharingPlan.from_spec("every:2", num_layers=6)
        >>> plan.source, plan.owners, plan.retention
        ((0, 0, 2, 2, 4, 4), (0, 2, 4), 0.5)
    """

    source: tuple[int, ...]
    spec: str = ""
    layer_types: tuple[str, ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        src = tuple(int(s) for s in self.source)
        name = self.spec or "source:" + ",".join(map(str, src))
        if not src:
            raise ValueError(f"plan {name!r}: a plan needs at least one layer")
        if self.layer_types is not None and len(self.layer_types) != len(src):
            raise ValueError(
                f"plan {name!r}: {len(src)} layers but {len(self.layer_types)} layer types"
            )
        if src[0] != 0:
            raise ValueError(f"plan {name!r}: layer 0 must own its KV (source[0] == 0), got {src[0]}")
        resolved: list[int] = []
        for layer, s in enumerate(src):
            if s < 0 or s > layer:
                raise ValueError(
                    f"plan {name!r}: layer {layer} reads layer {s}; a layer can only read itself "
                    f"or an earlier layer (0 <= source[l] <= l)"
                )
            if self.layer_types is not None and self.layer_types[s] != self.layer_types[layer]:
                raise ValueError(
                    f"plan {name!r}: layer {layer} ({self.layer_types[layer]}) cannot read layer {s} "
                    f"({self.layer_types[s]}); layers only read layers of the same attention type"
                )
            resolved.append(s if s == layer else resolved[s])
        object.__setattr__(self, "source", tuple(resolved))
        object.__setattr__(self, "spec", name)
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))

    # ----------------------------------------------------------------- building
    @classmethod
    def from_spec(
        cls, spec: str | SharingPlan, num_layers: int, layer_types: tuple[str, ...] | list[str] | None = None
    ) -> SharingPlan:
        """Parse a spec string for a model with ``num_layers`` layers.

        Args:
            spec: ``full``, ``every:K``, ``keep:F``, ``layers:...``, ``groups:...`` or ``source:...``.
            num_layers: the model's depth.
            layer_types: per-layer attention types, if the model mixes them.

        Returns:
            The validated plan.

        Raises:
            ValueError: naming the spec and what is wrong with it.
        """
        types = tuple(layer_types) if layer_types is not None and len(set(layer_types)) > 1 else None
        if isinstance(spec, SharingPlan):
            if spec.num_layers != num_layers:
                raise ValueError(
                    f"plan {spec.spec!r} has {spec.num_layers} layers but the model has {num_layers}"
                )
            return spec if types is None else cls(spec.source, spec.spec, types)  # check the types
        if num_layers <= 0:
            raise ValueError(f"plan {spec!r}: the model must have at least one layer, got {num_layers}")
        if types is not None and len(types) != num_layers:
            raise ValueError(f"plan {spec!r}: {num_layers} layers but {len(types)} layer types")
        text = spec.strip()
        kind, _, arg = text.partition(":")
        kind = kind.strip().lower()
        if kind == "source":
            return cls(_ints(text, arg, num_layers, exact_len=True), text, types)
        if kind == "full":
            if arg:
                raise ValueError(f"plan {text!r}: 'full' takes no argument")
            owners = list(range(num_layers))
        elif kind == "every":
            k = _one_int(text, arg)
            if k <= 0:
                raise ValueError(f"plan {text!r}: K must be a positive integer, got {k}")
            owners = list(range(0, num_layers, k))
        elif kind == "keep":
            try:
                frac = float(arg)
            except ValueError:
                raise ValueError(f"plan {text!r}: F must be a number in (0, 1], got {arg!r}") from None
            if not (0.0 < frac <= 1.0) or math.isnan(frac):
                raise ValueError(f"plan {text!r}: F must be in (0, 1], got {frac}")
            n = max(1, round(frac * num_layers))
            owners = sorted({(i * num_layers) // n for i in range(n)})
        elif kind == "layers":
            owners = _ints(text, arg, num_layers)
            if len(set(owners)) != len(owners):
                raise ValueError(f"plan {text!r}: layers repeat")
            if 0 not in owners:
                raise ValueError(f"plan {text!r}: layer 0 must keep its cache (it has no earlier layer)")
            if types is not None:
                for t in sorted(set(types)):
                    first = types.index(t)
                    if first not in owners:
                        raise ValueError(
                            f"plan {text!r}: layer {first} is the first {t!r} layer and must keep its cache"
                        )
        elif kind == "groups":
            try:
                sizes = [int(x) for x in _split(text, arg)]
            except ValueError:
                raise ValueError(f"plan {text!r}: expected a comma-separated list of group sizes") from None
            if any(s <= 0 for s in sizes):
                raise ValueError(f"plan {text!r}: group sizes must be positive")
            if sum(sizes) != num_layers:
                raise ValueError(
                    f"plan {text!r}: group sizes add up to {sum(sizes)} but the model has {num_layers} layers"
                )
            owners = [sum(sizes[:i]) for i in range(len(sizes))]
        else:
            raise ValueError(
                f"plan {text!r}: unknown kind {kind!r}; expected full, every:K, keep:F, layers:..., "
                "groups:... or source:..."
            )
        if types is not None:  # the first layer of each type always owns
            owners = sorted(set(owners) | {types.index(t) for t in set(types)})
        return cls(_nearest_owner(owners, num_layers, types), text, types)

    @classmethod
    def for_model(cls, spec: str | SharingPlan, config: Any) -> SharingPlan:
        """Parse ``spec`` for a transformers config (depth and attention types)."""
        shape = KVShape.from_config(config)
        return cls.from_spec(spec, shape.num_layers, shape.layer_types)

    @classmethod
    def from_owners(
        cls, owners: list[int] | tuple[int, ...], num_layers: int, layer_types: tuple[str, ...] | None = None
    ) -> SharingPlan:
        """The plan where exactly ``owners`` keep their cache."""
        return cls.from_spec("layers:" + ",".join(str(o) for o in sorted(owners)), num_layers, layer_types)

    # ---------------------------------------------------------------- reading
    @property
    def num_layers(self) -> int:
        return len(self.source)

    @property
    def owners(self) -> tuple[int, ...]:
        """Layers that keep a cache."""
        return tuple(layer for layer, s in enumerate(self.source) if s == layer)

    @property
    def retention(self) -> float:
        """Fraction of layers that keep a cache."""
        return len(self.owners) / self.num_layers

    @property
    def is_full(self) -> bool:
        return len(self.owners) == self.num_layers

    def kv_bytes_per_token(self, shape: KVShape, dtype: Any = "bf16", kv_quant: Any = None) -> int:
        """KV bytes one token costs under this plan (keys and values, all owners); with ``kv_quant``
        (``"int8"``, ``"int4"``), a token past the full-precision residual window, scales included."""
        self._check_shape(shape)
        return len(self.owners) * shape.token_bytes(dtype, kv_quant)

    def kv_bytes(self, shape: KVShape, tokens: int, batch: int = 1, dtype: Any = "bf16", kv_quant: Any = None) -> int:
        """KV bytes for ``batch`` sequences of ``tokens`` tokens: what the owners hold
        (:meth:`KVShape.layer_bytes`: sliding windows and ``kv_quant`` included)."""
        self._check_shape(shape)
        return sum(shape.layer_bytes(owner, tokens, batch, dtype, kv_quant) for owner in self.owners)

    def describe(self) -> str:
        """One line for logs: spec, owners and retention."""
        owners = ",".join(map(str, self.owners))
        return (
            f"plan {self.spec}: {len(self.owners)}/{self.num_layers} layers keep KV "
            f"({100 * self.retention:.1f}%), owners [{owners}]"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; :meth:`from_dict` reads it back."""
        out: dict[str, Any] = {
            "spec": self.spec,
            "source": list(self.source),
            "owners": list(self.owners),
            "retention": self.retention,
        }
        if self.layer_types is not None:
            out["layer_types"] = list(self.layer_types)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SharingPlan:
        types = data.get("layer_types")
        return cls(tuple(data["source"]), data.get("spec", ""), tuple(types) if types else None)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def __str__(self) -> str:
        return self.spec

    def _check_shape(self, shape: KVShape) -> None:
        if shape.num_layers != self.num_layers:
            raise ValueError(
                f"plan {self.spec!r} has {self.num_layers} layers but the model has {shape.num_layers}"
            )


def _nearest_owner(owners: list[int], num_layers: int, types: tuple[str, ...] | None) -> tuple[int, ...]:
    owner_set = set(owners)
    last: dict[str, int] = {}
    source = []
    for layer in range(num_layers):
        t = types[layer] if types is not None else ""
        if layer in owner_set:
            last[t] = layer
        source.append(last[t])
    return tuple(source)


def _split(spec: str, arg: str) -> list[str]:
    parts = [p.strip() for p in arg.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"plan {spec!r}: expected a comma-separated list of integers")
    return parts


def _one_int(spec: str, arg: str) -> int:
    try:
        return int(arg)
    except ValueError:
        raise ValueError(f"plan {spec!r}: expected an integer, got {arg!r}") from None


def _ints(spec: str, arg: str, num_layers: int, exact_len: bool = False) -> list[int]:
    try:
        values = [int(p) for p in _split(spec, arg)]
    except ValueError:
        raise ValueError(f"plan {spec!r}: expected a comma-separated list of integers") from None
    if exact_len and len(values) != num_layers:
        raise ValueError(f"plan {spec!r}: {len(values)} entries but the model has {num_layers} layers")
    for v in values:
        if not 0 <= v < num_layers:
            raise ValueError(f"plan {spec!r}: layer {v} is out of range for a {num_layers}-layer model")
    return values


def parse_plan_list(specs: str | list[str]) -> list[str]:
    """Split a comma-separated list of plan specs.

    Commas inside a list spec stay with it (``layers:0,3,7``), and a bare number
    after ``every:K`` or ``keep:F`` is another spec of that kind, so
    ``"full,every:2,4"`` gives ``["full", "every:2", "every:4"]``.
    """
    if isinstance(specs, list):
        return [s.strip() for s in specs if s.strip()]
    out: list[str] = []
    for part in (p.strip() for p in specs.split(",")):
        if not part:
            continue
        bare_number = ":" not in part and part.replace(".", "", 1).isdigit()
        kind = out[-1].split(":", 1)[0] if out and ":" in out[-1] else None
        if bare_number and kind in ("every", "keep"):
            out.append(f"{kind}:{part}")
        elif bare_number and kind is not None:
            out[-1] += "," + part
        else:
            out.append(part)
    return out
