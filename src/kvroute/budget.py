"""Memory budgets: how many owner layers a KV budget allows.

A budget is one of:

- a fraction of the layers, ``0.25`` (written with a decimal point);
- a number of owner layers, ``8`` (a plain integer);
- a memory size with a unit, ``6GiB``, ``512MB``, ``1e9B``, for ``batch`` sequences
  of ``context`` tokens in ``dtype``.

Example:
    >>> from kvroute.plan import KVShape
    >>> shape = KVShape(num_layers=36, kv_heads=8, head_dim=128)
    >>> max_owners_for_memory(shape, parse_bytes("6GiB"), batch=8, context=16384)
    12
"""

from __future__ import annotations

import re
from typing import Any

from kvroute.plan import KVShape

_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}


def parse_bytes(text: str | int) -> int:
    """``"6GiB"`` -> 6442450944. Units: B, KB/MB/GB/TB (powers of 10), KiB/MiB/GiB/TiB, K/M/G/T (powers of 2)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read memory size {text!r}; write e.g. 6GiB, 512MB or 1000000B")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def size_option(flag: str, value: str | int) -> int:
    """:func:`parse_bytes` for an option: the error names ``flag``."""
    try:
        return parse_bytes(value)
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from None


def has_unit(text: str) -> bool:
    """Whether a budget string names a memory size (``6GiB``) rather than a fraction or layer count."""
    return bool(re.search(r"[0-9.]\s*[a-zA-Z]+\s*$", str(text))) and not str(text).strip().lower().endswith("e")


def format_bytes(n: float) -> str:
    """``6442450944`` -> ``"6.00 GiB"``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def mandatory_owners(shape: KVShape) -> list[int]:
    """Layers every plan keeps: layer 0, and the first layer of each attention type."""
    if shape.layer_types is None:
        return [0]
    return sorted({shape.layer_types.index(t) for t in set(shape.layer_types)})


def layer_bytes(shape: KVShape, context: int, batch: int = 1, dtype: Any = "bf16") -> list[int]:
    """KV bytes each layer costs when it owns a cache (:meth:`KVShape.layer_bytes`)."""
    return [shape.layer_bytes(layer, context, batch, dtype) for layer in range(shape.num_layers)]


def max_owners_for_memory(shape: KVShape, memory: int, batch: int, context: int, dtype: Any = "bf16") -> int:
    """The most owner layers whose KV fits ``memory`` bytes; 0 when even the sparsest plan does not fit.

    The mandatory owners (layer 0, first layer of each type) come first, then the cheapest others.
    """
    if batch <= 0 or context <= 0:
        raise ValueError(f"batch and context must be positive, got batch={batch}, context={context}")
    costs = layer_bytes(shape, context, batch, dtype)
    must = mandatory_owners(shape)
    used = sum(costs[i] for i in must)
    if used > memory:
        return 0
    count = len(must)
    for cost in sorted(costs[i] for i in range(shape.num_layers) if i not in must):
        if used + cost > memory:
            break
        used += cost
        count += 1
    return count


def owners_for_budget(
    budget: str | float | int,
    shape: KVShape,
    batch: int = 1,
    context: int | None = None,
    dtype: Any = "bf16",
) -> int:
    """Turn a budget (fraction, owner-layer count, or memory size) into a number of owner layers.

    Raises:
        ValueError: a budget above the full cache, below one owner layer (or below the
            mandatory owners), or a memory budget without a context length.
    """
    layers = shape.num_layers
    must = len(mandatory_owners(shape))
    text = str(budget).strip()
    if isinstance(budget, float) or "." in text and not has_unit(text):
        frac = float(text)
        if frac > 1.0:
            raise ValueError(f"budget {text}: a fraction of the cache must be at most 1.0 (full)")
        if frac <= 0.0:
            raise ValueError(f"budget {text}: a fraction of the cache must be positive")
        n = round(frac * layers)
        if n < must:
            raise ValueError(
                f"budget {text}: {frac:g} x {layers} layers is below {must} owner layer(s), "
                f"the sparsest plan (at least {must / layers:.3f})"
            )
        return n
    if has_unit(text):
        if context is None:
            raise ValueError(f"budget {text}: a memory budget needs a context length (--context)")
        memory = parse_bytes(text)
        full = sum(layer_bytes(shape, context, batch, dtype))
        if memory >= full:
            raise ValueError(
                f"budget {text}: the full cache ({format_bytes(full)} for batch {batch} x {context} tokens) "
                "already fits; no sharing needed"
            )
        n = max_owners_for_memory(shape, memory, batch, context, dtype)
        if n < must:
            one = sum(layer_bytes(shape, context, batch, dtype)[i] for i in mandatory_owners(shape))
            raise ValueError(
                f"budget {text}: even the sparsest plan ({must} owner layer(s), {format_bytes(one)} for "
                f"batch {batch} x {context} tokens) does not fit"
            )
        return n
    try:
        n = int(text)
    except ValueError:
        raise ValueError(
            f"cannot read budget {text!r}; write a fraction (0.25), a number of owner layers (8) "
            "or a memory size (6GiB)"
        ) from None
    if n > layers:
        raise ValueError(f"budget {n} owner layers is above full: the model has {layers} layers")
    if n < must:
        raise ValueError(f"budget {n} owner layers is below the sparsest plan ({must} owner layer(s))")
    return n


# ----------------------------------------------------------------------- reports
def plan_report(plan: Any, shape: KVShape, batch: int = 1, context: int = 4096, dtype: Any = "bf16",
                kv_quant: Any = None) -> str:
    """What ``kvroute plan show`` prints: each layer's source, the owners, KV bytes against full
    (in ``dtype``, unquantized); with ``kv_quant``, the plan's owners store KV quantized."""
    from kvroute.kvquant import KVQuant
    from kvroute.plan import SharingPlan

    quant = KVQuant.parse(kv_quant)
    stored = f"{dtype}" + (f", {quant.name} past the newest {quant.residual} tokens" if quant else "")

    full = SharingPlan.from_spec("full", shape.num_layers, shape.layer_types)
    lines = [plan.describe(), "", "layer  source  kv"]
    for layer, src in enumerate(plan.source):
        kind = f"  ({shape.layer_types[layer]})" if shape.layer_types is not None else ""
        lines.append(f"{layer:5d}  {src:6d}  {'own' if src == layer else 'reads ' + str(src)}{kind}")
    per_tok, full_tok = plan.kv_bytes_per_token(shape, dtype, quant), full.kv_bytes_per_token(shape, dtype)
    total, full_total = plan.kv_bytes(shape, context, batch, dtype, quant), full.kv_bytes(shape, context, batch, dtype)
    lines += [
        "",
        f"owners: {','.join(map(str, plan.owners))}",
        f"KV bytes per token ({stored}): {format_bytes(per_tok)} vs full {format_bytes(full_tok)} "
        f"({per_tok / full_tok:.3f}x)",
        f"KV for batch {batch} x {context} tokens: {format_bytes(total)} vs full {format_bytes(full_total)} "
        f"(saves {format_bytes(full_total - total)})",
    ]
    return "\n".join(lines)


def budget_report(shape: KVShape, memory: int, batch: int, context: int, dtype: Any = "bf16") -> tuple[int, str]:
    """What ``kvroute plan budget`` prints: the owner layers ``memory`` allows, and a uniform plan that fits.

    Returns:
        ``(owners, text)``; ``owners`` is 0 when even the sparsest plan does not fit.
    """
    from kvroute.plan import SharingPlan

    layers = shape.num_layers
    costs = layer_bytes(shape, context, batch, dtype)
    head = f"KV budget {format_bytes(memory)} for batch {batch} x {context} tokens ({dtype})"
    n = max_owners_for_memory(shape, memory, batch, context, dtype)
    if n == 0:
        sparsest = sum(costs[i] for i in mandatory_owners(shape))
        return 0, (
            f"{head}: does not fit. Even the sparsest plan ({len(mandatory_owners(shape))} owner layer(s)) "
            f"needs {format_bytes(sparsest)}; lower the batch or the context, or use a smaller dtype."
        )
    if n >= layers:
        return n, f"{head}: the full cache fits ({format_bytes(sum(costs))}, all {layers} layers own their KV)."
    fits = [k for k in range(2, layers + 1)
            if SharingPlan.from_spec(f"every:{k}", layers, shape.layer_types).kv_bytes(shape, context, batch, dtype)
            <= memory]
    text = f"{head}: allows {n} of {layers} owner layers ({100 * n / layers:.1f}% of the cache; full needs {format_bytes(sum(costs))})."
    if fits:
        plan = SharingPlan.from_spec(f"every:{fits[0]}", layers, shape.layer_types)
        text += (f"\n  uniform plan that fits: every:{fits[0]} ({len(plan.owners)} owners, "
                 f"{format_bytes(plan.kv_bytes(shape, context, batch, dtype))})")
    text += f"\n  best {n}-owner plan for your data: kvroute plan search MODEL --budget {n} --data FILES"
    return n, text
