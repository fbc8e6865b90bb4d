"""The calibration file beside a checkpoint (``kvroute_calibration.safetensors``) and its checks.

A calibration belongs to a (model, plan) pair: the file records the model's shape and a digest
of its weights, and loading refuses a file fitted for another model.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from kvroute.calibration.maps import _attach, _attention_layers
from kvroute.hf.attention import LayerMaps
from kvroute.hf.patch import get_router
from kvroute.plan import KVShape, SharingPlan
from kvroute.router import parse_route_key

CALIBRATION_FILE = "kvroute_calibration.safetensors"
FORMAT_VERSION = 1


def model_shape(config: Any) -> dict[str, Any]:
    """The shape a calibration must match, from a transformers config."""
    shape = KVShape.from_config(config)
    return {"model_type": getattr(config, "model_type", None), "num_layers": shape.num_layers,
            "kv_heads": shape.kv_heads, "head_dim": shape.head_dim, "heads": config.num_attention_heads}


def weight_digest(o_proj_weight: torch.Tensor) -> float:
    """One layer's entry of the weights digest: mean ``|W_o|``. Cheap: it catches another
    checkpoint's calibration, not every change of weights (a LoRA on q/v passes)."""
    return round(float(o_proj_weight.detach().float().abs().mean()), 8)


def check_shape(path: Path, saved: dict[str, Any], config: Any) -> None:
    """Raise when the calibration in ``path`` (its saved ``model`` entry) was fitted for another shape."""
    for key, value in model_shape(config).items():
        if saved.get(key) != value:
            raise ValueError(f"{path} was fitted for another model: {key} {saved.get(key)!r} != {value!r}")


def check_digest(path: Path, saved: list[float], digest: list[float | None]) -> None:
    """Raise when the weights' digest is not the one the calibration in ``path`` was fitted on."""
    if len(saved) != len(digest) or any(d is None for d in digest) or not all(
        math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-7) for a, b in zip(saved, digest)
    ):
        raise ValueError(f"{path} was fitted for a model with other weights; calibrate this checkpoint again")


def _fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """What a calibration must match: the model's shape and its weights digest."""
    return {**model_shape(model.config), "digest": [weight_digest(att.o_proj.weight) for att in _attention_layers(model)]}


def save_calibration(model: torch.nn.Module, folder: str | os.PathLike) -> Path | None:
    """Write every calibration the model holds to ``folder/kvroute_calibration.safetensors`` (atomically).

    Returns:
        The file written, or None when the model holds no calibration (an old file is removed).
    """
    path = Path(folder) / CALIBRATION_FILE
    tensors: dict[str, torch.Tensor] = {}
    plans: dict[str, Any] = {}
    info = get_router(model).calibration_info
    for att in _attention_layers(model):
        for key, maps in att.calibration.items():
            plans.setdefault(key, info.get(key, {"source": list(parse_route_key(key))}))
            for name in ("query", "value"):
                t = getattr(maps, name)
                if t is not None:
                    tensors[f"{key}.{att.layer_idx}.{name}"] = t.detach().float().cpu().contiguous()
    return write_maps_file(path, tensors, {"version": FORMAT_VERSION, "model": _fingerprint(model), "plans": plans})


def write_maps_file(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path | None:
    """Write ``tensors`` with ``meta`` (as JSON) to ``path`` atomically; with no tensors, remove ``path``."""
    from safetensors.torch import save_file

    if not tensors:
        path.unlink(missing_ok=True)
        return None
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"kvroute": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def read_maps_file(path: Path, version: int, what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(meta, tensors)`` of a file :func:`write_maps_file` wrote, both empty when it is absent.

    Raises:
        ValueError: when the file has another format ``version`` (``what`` names it).
    """
    from safetensors import safe_open

    if not path.is_file():
        return {}, {}
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("kvroute", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("version") != version:
        raise ValueError(f"{path}: unsupported {what} format {meta.get('version')!r} (expected {version})")
    return meta, tensors


def read_calibration(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[tuple[int, ...], dict[int, LayerMaps]]]:
    """Read ``folder/kvroute_calibration.safetensors`` without a model (vLLM folds it at load).

    Returns:
        ``(meta, maps)``: the file's metadata (``model`` fingerprint, ``plans`` info) and, per plan
        source map, the :class:`LayerMaps` (float32, CPU) of each non-owner layer. Both empty when
        the folder has no calibration.
    """
    path = Path(folder) / CALIBRATION_FILE
    meta, tensors = read_maps_file(path, FORMAT_VERSION, "calibration")
    if not tensors:
        return {}, {}
    maps: dict[tuple[int, ...], dict[int, LayerMaps]] = {}
    for key, plan_info in meta["plans"].items():
        source = tuple(int(x) for x in plan_info["source"])
        maps[source] = {
            l: LayerMaps(tensors.get(f"{key}.{l}.query"), tensors.get(f"{key}.{l}.value"))
            for l in range(len(source))
            if f"{key}.{l}.value" in tensors or f"{key}.{l}.query" in tensors
        }
    return meta, maps


def load_calibration(model: torch.nn.Module, folder: str | os.PathLike) -> list[tuple[int, ...]]:
    """Attach the calibrations saved in ``folder`` (if any) to a routed model.

    Returns:
        The source maps of the plans loaded.

    Raises:
        ValueError: when the file was fitted for another model (shape or weights differ).
    """
    meta, plans = read_calibration(folder)
    if not plans:
        return []
    path = Path(folder) / CALIBRATION_FILE
    check_shape(path, meta["model"], model.config)
    check_digest(path, meta["model"]["digest"], _fingerprint(model)["digest"])
    dtype = next(model.parameters()).dtype
    for source, maps in plans.items():
        SharingPlan.for_model("source:" + ",".join(map(str, source)), model.config)  # checks the layers
        _attach(model, source, {l: m.to(dtype) for l, m in maps.items()})
    get_router(model).calibration_info.update(meta["plans"])
    return list(plans)
