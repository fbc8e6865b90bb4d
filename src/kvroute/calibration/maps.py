"""The calibration maps a routed model holds: one :class:`LayerMaps` per non-owner layer and plan.

They live on the routed attention layers (``att.calibration``, keyed by the plan's source map);
:func:`kvroute.set_plan` picks them up.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from kvroute.hf.attention import LayerMaps, RoutedAttention
from kvroute.hf.patch import get_router
from kvroute.plan import SharingPlan
from kvroute.router import parse_route_key, route_key


def _attention_layers(model: torch.nn.Module) -> list[RoutedAttention]:
    layers = sorted((m for m in model.modules() if isinstance(m, RoutedAttention)), key=lambda m: m.layer_idx)
    if not layers:
        raise ValueError("this model is not routed; call kvroute.apply(model, ...) first")
    return layers


def calibrated_sources(model: torch.nn.Module) -> list[tuple[int, ...]]:
    """Source maps of the plans this model holds a calibration for."""
    keys = {k for att in _attention_layers(model) for k in att.calibration}
    return sorted(parse_route_key(k) for k in keys)


def is_calibrated(model: torch.nn.Module, plan: SharingPlan | str | None = None) -> bool:
    """Whether ``plan`` (default: the model's current plan) runs with a calibration: its own, or
    pairwise maps (:mod:`kvroute.pairs`) for every non-owner layer."""
    plan = get_router(model).plan if plan is None else SharingPlan.for_model(plan, model.config)
    if plan.is_full:
        return False
    if plan.source in calibrated_sources(model):
        return True
    layers = _attention_layers(model)
    return all(str(o) in layers[l].pairs for l, o in enumerate(plan.source) if o != l)


def remove_calibration(model: torch.nn.Module, plan: SharingPlan | str | None = None) -> None:
    """Drop the calibration of ``plan``, or of every plan when ``plan`` is None."""
    key = None if plan is None else route_key(SharingPlan.for_model(plan, model.config).source)
    for att in _attention_layers(model):
        for k in list(att.calibration):
            if key is None or k == key:
                del att.calibration[k]
    info = get_router(model).calibration_info
    for k in list(info):
        if key is None or k == key:
            del info[k]


def _plan_maps(model: torch.nn.Module, plan: SharingPlan) -> dict[int, LayerMaps]:
    key = route_key(plan.source)
    return {att.layer_idx: att.calibration[key] for att in _attention_layers(model) if key in att.calibration}


def _attach(model: torch.nn.Module, source: tuple[int, ...], maps: dict[int, LayerMaps]) -> None:
    key = route_key(source)
    for att in _attention_layers(model):
        if key in att.calibration:
            del att.calibration[key]
        if att.layer_idx in maps:
            param = next(att.parameters())
            att.calibration[key] = maps[att.layer_idx].to(param.device)


@contextlib.contextmanager
def _running(model: torch.nn.Module, plan: SharingPlan) -> Iterator[None]:
    """Run ``model`` under ``plan`` in eval mode, restoring its plan and mode after."""
    router = get_router(model)
    saved, training = router.plan, model.training
    router.plan = plan
    model.eval()
    try:
        yield
    finally:
        router.plan = saved
        model.train(training)
