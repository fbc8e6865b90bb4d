"""Pairwise maps: one calibration per (layer, source) pair, serving every plan at once.

A plan's calibration (:mod:`kvroute.calibrate`) fits maps for one plan. Pairwise maps key
each map by the pair instead: whenever a route or a plan makes layer ``l`` read the KV of
an earlier layer ``o``, ``l`` applies the pair's :class:`~kvroute.hf.attention.LayerMaps`
(a query map before RoPE, a value map on each head's attention output). One set covers
every plan, so:

- ``kvroute calibrate CHECKPOINT --pairs`` fits them in closed form (:func:`fit_pair_maps`:
  each pair on full-cache text, the same fit as a plan's calibration), and any plan picked
  at deploy time is calibrated with no per-plan work;
- ``kvroute train --pair-maps`` trains them with the routes (R-CLA draws a pair, the pair's
  maps get its gradient), starting from the closed form when the checkpoint has one and from
  the identity otherwise.

There are ``L(L-1)/2`` pairs (same-type layers only), each with one ``D x D`` value map per
KV head and one complex scalar per query head and RoPE frequency pair
(:func:`pair_parameter_count`). A plan's own calibration, when the model has one, comes
before the pairs. They are saved beside a checkpoint in ``kvroute_pairs.safetensors``.

Example:
    >>> model = kvroute.load("runs/demo/rcla-mix-text/final")            # doctest: +SKIP
    >>> kvroute.pairs.fit_pair_maps(model, ["sotu/train"], tokenizer=tok)          # doctest: +SKIP
    >>> kvroute.set_plan(model, "layers:0,3,9,17")   # calibrated by its pairs      # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from kvroute.calibrate import CalibrationConfig
from kvroute.calibration.fit import _capture, _LayerFit, _split, calibration_chunks_of
from kvroute.calibration.maps import _attention_layers, _running
from kvroute.calibration.store import (
    _fingerprint,
    check_digest,
    check_shape,
    model_shape,
    read_maps_file,
    write_maps_file,
)
from kvroute.hf.attention import LayerMaps
from kvroute.plan import KVShape, SharingPlan
from kvroute.search import mean_loss

PAIRS_FILE = "kvroute_pairs.safetensors"
#: what the pairs' parameter names contain (``...self_attn.pairs.3.value``)
PAIRS_PREFIX = "self_attn.pairs."
_PAIR_PARAM = re.compile(r"layers\.(?P<l>\d+)\.self_attn\.pairs\.(?P<o>\d+)\.(?P<name>query|value)$")
_O_PROJ = re.compile(r"layers\.(?P<l>\d+)\.self_attn\.o_proj\.weight$")
FORMAT_VERSION = 1
Pair = tuple[int, int]  # (layer, source)


def all_pairs(config: Any) -> list[Pair]:
    """Every (layer, earlier source) pair a route can draw: same attention type, source < layer."""
    shape = KVShape.from_config(config)
    types = shape.layer_types
    return [(l, o) for l in range(shape.num_layers) for o in range(l)
            if types is None or types[o] == types[l]]


def pair_parameter_count(config: Any) -> int:
    """Parameters of a full set of pairwise maps: per pair, ``H_kv * D^2`` (value) + ``H * D`` (query)."""
    shape = KVShape.from_config(config)
    per_pair = shape.kv_heads * shape.head_dim ** 2 + config.num_attention_heads * shape.head_dim
    return len(all_pairs(config)) * per_pair


def identity_maps(config: Any) -> LayerMaps:
    """Maps that change nothing: query scalars ``1 + 0i``, identity value matrices (trainable)."""
    shape = KVShape.from_config(config)
    heads, dim = config.num_attention_heads, shape.head_dim
    query = torch.zeros(heads, dim // 2, 2)
    query[..., 0] = 1.0
    value = torch.eye(dim).repeat(shape.kv_heads, 1, 1)
    return LayerMaps(query, value, trainable=True)


def pair_maps(model: torch.nn.Module) -> dict[Pair, LayerMaps]:
    """The model's pairwise maps, by (layer, source)."""
    return {(att.layer_idx, int(o)): m for att in _attention_layers(model) for o, m in att.pairs.items()}


def has_pair_maps(model: torch.nn.Module) -> bool:
    return any(len(att.pairs) for att in _attention_layers(model))


def covers(model: torch.nn.Module, plan: SharingPlan) -> bool:
    """Whether every non-owner layer of ``plan`` has a pairwise map for the owner it reads."""
    pairs = pair_maps(model)
    todo = [(l, o) for l, o in enumerate(plan.source) if o != l]
    return bool(todo) and all(p in pairs for p in todo)


def set_pair_maps(model: torch.nn.Module, maps: dict[Pair, LayerMaps]) -> None:
    """Attach ``maps`` (replacing those of the same pairs), as trainable parameters on the layer's device."""
    valid = set(all_pairs(model.config))
    layers = _attention_layers(model)
    for (l, o), m in maps.items():
        if (l, o) not in valid:
            raise ValueError(f"no route reads layer {o}'s KV from layer {l} in this model (pair ({l}, {o}))")
        query = None if m.query is None else m.query.detach().float()
        layers[l].pairs[str(o)] = LayerMaps(query, m.value.detach().float(), trainable=True).to(
            layers[l].o_proj.weight.device)


def add_pair_maps(model: torch.nn.Module) -> int:
    """Give every pair that has no map an identity one; returns how many were added."""
    have = pair_maps(model)
    missing = {p: identity_maps(model.config) for p in all_pairs(model.config) if p not in have}
    set_pair_maps(model, missing)
    return len(missing)


def remove_pair_maps(model: torch.nn.Module) -> None:
    for att in _attention_layers(model):
        att.pairs.clear()


def plan_maps(pairs: dict[Pair, LayerMaps], plan: SharingPlan, heads: int) -> dict[int, LayerMaps] | None:
    """A plan's maps taken from the pairs (value maps per query head, float32, frozen), or None
    when a non-owner layer of the plan has no pair. vLLM folds these like a plan's calibration."""
    out = {}
    for l, o in enumerate(plan.source):
        if o == l:
            continue
        if (l, o) not in pairs:
            return None
        m = pairs[(l, o)]
        value = m.value.detach().float()
        value = value.repeat_interleave(heads // value.shape[0], dim=0)
        out[l] = LayerMaps(None if m.query is None else m.query.detach().float(), value)
    return out or None


# ---------------------------------------------------------------------------- the fit
@dataclass
class PairFit:
    """What :func:`fit_pair_maps` fitted, and how each reported plan scored on held-out chunks."""

    pairs: int
    seconds: float
    loss_full: float
    plans: dict[str, dict[str, float]] = field(default_factory=dict)  # spec -> {"plain": loss, "pairs": loss}

    def summary(self) -> str:
        ppl = lambda x: f"{math.exp(x):,.1f}" if x < 50 else "inf"  # noqa: E731
        per_plan = "; ".join(f"{spec} {ppl(v['plain'])} -> {ppl(v['pairs'])}" for spec, v in self.plans.items())
        return (f"pairwise maps: {self.pairs} pairs in {self.seconds:.0f} s; held-out calibration ppl "
                f"(full cache {ppl(self.loss_full)}){': ' + per_plan if per_plan else ''}")


def fit_pair_maps(
    model: torch.nn.Module,
    data: Iterable[str | os.PathLike] | torch.Tensor,
    config: CalibrationConfig | None = None,
    tokenizer: Any = None,
    report_plans: Iterable[str] = ("every:2", "every:4"),
    progress: bool = True,
) -> PairFit:
    """Fit every pair's maps in closed form on full-cache activations and attach them (replacing any).

    Each pair (l, o) gets the fit a plan's calibration gives a non-owner layer (logit-aware
    query map when ``config.query``, then the output-aware value map with its ridge chosen on
    held-out chunks), with both layers' inputs taken under the full cache, since a pair serves
    every plan. Value maps are one per KV head.

    Args:
        data: text files/folders, or ``(N, T)`` token ids already cut into chunks.
        report_plans: plans whose held-out loss is measured before and after.
    """
    config = config or CalibrationConfig()
    config = CalibrationConfig(**{**asdict(config), "value_maps": "group"})
    chunks = calibration_chunks_of(data, tokenizer, config.tokens, config.chunk_tokens, "fit_pair_maps()")
    plans = [SharingPlan.for_model(p, model.config) for p in report_plans]
    start = time.perf_counter()
    train, val = _split(chunks, config.val_fraction)
    full = SharingPlan.for_model("full", model.config)
    remove_pair_maps(model)
    with torch.no_grad(), _running(model, full):
        loss_full = mean_loss(model, val, config.batch_size)
    report: dict[str, dict[str, float]] = {}
    for plan in plans:
        with torch.no_grad(), _running(model, plan):
            report[plan.spec] = {"plain": mean_loss(model, val, config.batch_size)}
    cap = _capture(model, full, torch.cat([train, val]), config.batch_size)
    layers = _attention_layers(model)
    fitted: dict[Pair, LayerMaps] = {}
    group = model.config.num_attention_heads // KVShape.from_config(model.config).kv_heads
    pairs = all_pairs(model.config)
    device = layers[0].o_proj.weight.device
    inputs = [x.to(device) for x in cap.inputs]  # captured on the CPU; fitted where the model is
    for l, o in tqdm(pairs, desc="fit pairwise maps", leave=False, disable=not progress):
        fit = _LayerFit(layers[l], layers[o], inputs[l], inputs[l], inputs[o], cap.cos[l].to(device),
                        cap.sin[l].to(device), train.shape[0], config)
        query = fit.query_map() if config.query else None
        value, _ = fit.value_map(query)
        fitted[(l, o)] = LayerMaps(query, value[::group].contiguous())
    set_pair_maps(model, fitted)
    for plan in plans:
        with torch.no_grad(), _running(model, plan):
            report[plan.spec]["pairs"] = mean_loss(model, val, config.batch_size)
    result = PairFit(len(pairs), time.perf_counter() - start, loss_full, report)
    get_pair_info(model).update({"fit": asdict(result), "config": asdict(config)})
    if progress:
        print(result.summary(), flush=True)
    return result


def get_pair_info(model: torch.nn.Module) -> dict[str, Any]:
    """What was recorded about the model's pairs (fit results, training), saved with them."""
    from kvroute.hf.patch import get_router

    return get_router(model).pair_info


# ---------------------------------------------------------------------------- persistence
def save_pair_maps(model: torch.nn.Module, folder: str | os.PathLike,
                   state_dict: dict[str, torch.Tensor] | None = None) -> Path | None:
    """Write the model's pairwise maps to ``folder/kvroute_pairs.safetensors`` (atomically).

    Args:
        state_dict: the model's gathered full state dict when it is sharded (FSDP): the maps
            and the weights digest are read from it.

    Returns:
        The file written, or None when the model has none (an old file is removed).
    """
    from kvroute.calibration.store import weight_digest

    path = Path(folder) / PAIRS_FILE
    tensors = {}
    if state_dict is None:
        for (l, o), m in pair_maps(model).items():
            for name in ("query", "value"):
                t = getattr(m, name)
                if t is not None:
                    tensors[f"pair.{l}.{o}.{name}"] = t.detach().float().cpu().contiguous()
        fingerprint = _fingerprint(model)
    else:
        for key, t in state_dict.items():
            match = _PAIR_PARAM.search(key)
            if match is not None:
                tensors[f"pair.{match['l']}.{match['o']}.{match['name']}"] = t.detach().float().cpu().contiguous()
        fingerprint = {**model_shape(model.config), "digest": [
            weight_digest(state_dict[k]) for k in sorted(
                (k for k in state_dict if _O_PROJ.search(k)), key=lambda k: int(_O_PROJ.search(k)["l"]))]}
    return write_maps_file(path, tensors, {"version": FORMAT_VERSION, "model": fingerprint, "info": get_pair_info(model)})


def read_pair_maps(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[Pair, LayerMaps]]:
    """Read ``folder/kvroute_pairs.safetensors`` without a model: ``(meta, maps)``, both empty if absent."""
    path = Path(folder) / PAIRS_FILE
    meta, tensors = read_maps_file(path, FORMAT_VERSION, "pairwise-maps")
    maps: dict[Pair, LayerMaps] = {}
    for key in tensors:
        _, l, o, name = key.split(".")
        if name == "value":
            maps[(int(l), int(o))] = LayerMaps(tensors.get(f"pair.{l}.{o}.query"), tensors[key])
    return meta, maps


def load_pair_maps(model: torch.nn.Module, folder: str | os.PathLike) -> int:
    """Attach the pairwise maps saved in ``folder`` (if any); returns how many.

    Raises:
        ValueError: when they were fitted for another model (shape or weights differ).
    """
    meta, maps = read_pair_maps(folder)
    if not maps:
        return 0
    path = Path(folder) / PAIRS_FILE
    check_shape(path, meta["model"], model.config)
    check_digest(path, meta["model"]["digest"], _fingerprint(model)["digest"])
    remove_pair_maps(model)
    set_pair_maps(model, maps)
    get_pair_info(model).update(meta.get("info", {}))
    return len(maps)
