"""Checkpoint weights as a routed vLLM model loads them: routing and calibration folding.

A layer that keeps no KV under the plan loads only its query projection (as ``query``, see
:data:`QUERY`); its ``k_proj``/``v_proj`` and ``k_norm`` are dropped (:func:`route_weights`).

A plan calibrated by :mod:`kvroute.calibrate` (``kvroute_calibration.safetensors`` in the
checkpoint folder) is served with its calibration: :func:`plan_calibration` finds and checks
it, and :meth:`CalibrationFold.fold` folds its maps into the checkpoint's weights as vLLM
loads them: value maps into ``o_proj``, query maps into the query projection where no
``q_norm`` sits between it and RoPE.

Pure torch: nothing here needs vLLM, so it is tested without it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kvroute.plan import SharingPlan
from kvroute.vllm.config import as_config

if TYPE_CHECKING:
    from kvroute.hf.attention import LayerMaps

#: A tensor of the calibration file (``r0_0_2_2.1.value``) or of the pairwise maps
#: (``pair.3.1.value``): vLLM reads every ``*.safetensors`` of a folder without an index, so
#: the routed models skip these.
CALIBRATION_TENSOR = re.compile(r"^(?:r\d+(?:_\d+)*|pair\.\d+)\.\d+\.(?:query|value)$")
#: The query projection of a layer that keeps no KV. Not ``q_proj``: vLLM's
#: weight mappers rewrite ``.q_proj`` into the fused ``qkv_proj``.
QUERY = "query"
#: A checkpoint weight that a calibration folds into (HF names, before vLLM renames them).
_FOLD_WEIGHT = re.compile(
    r"^(?:.*\.)?layers\.(?P<layer>\d+)\.self_attn\.(?P<part>q_proj|o_proj)\.(?P<kind>weight|bias)$"
)
#: An attention weight of a layer that may keep no KV.
_ATTN_WEIGHT = re.compile(
    r"^(?P<head>(?:.*\.)?layers\.(?P<layer>\d+)\.self_attn\.)(?P<part>[qkv]_proj|k_norm)\.(?P<tail>.+)$"
)


def route_weights(
    weights: Iterable[tuple[str, torch.Tensor]], plan: SharingPlan
) -> Iterable[tuple[str, torch.Tensor]]:
    """Checkpoint weights as a routed model loads them.

    For a layer that keeps no KV, ``q_proj`` loads into its query projection and
    ``k_proj``, ``v_proj`` (weights and biases) and ``k_norm`` are dropped, never loaded.
    The calibration file's tensors, which vLLM reads with the weights, are dropped too.
    """
    for name, tensor in weights:
        if CALIBRATION_TENSOR.match(name):
            continue
        match = _ATTN_WEIGHT.match(name)
        if match is not None:
            layer = int(match["layer"])
            if plan.source[layer] != layer:
                if match["part"] != "q_proj":
                    continue
                name = f"{match['head']}{QUERY}.{match['tail']}"
        yield name, tensor


def fold_query(weight: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """A query projection's weight (or bias) with a query map folded into its rows.

    Exact where nothing sits between the projection and RoPE (no ``q_norm``):
    per head ``h`` and RoPE pair ``f``, row ``f`` becomes ``re * row_f - im * row_{f+D/2}``
    and row ``f + D/2`` becomes ``re * row_{f+D/2} + im * row_f``, as
    :meth:`kvroute.hf.attention.LayerMaps.map_query` does to the query.

    Args:
        weight: ``(H * D, hidden)`` weight or ``(H * D,)`` bias.
        query: ``(H, D/2, 2)`` query map (real and imaginary parts).

    Returns:
        The folded tensor, in ``weight``'s shape and dtype.
    """
    heads, half, _ = query.shape
    w = weight.float().unflatten(0, (heads, 2, half))  # (H, 2, D/2, ...)
    tail = (1,) * (w.dim() - 3)
    re_, im = query[..., 0].float().view(heads, half, *tail), query[..., 1].float().view(heads, half, *tail)
    w1, w2 = w[:, 0], w[:, 1]  # (H, D/2, ...): rows f and f + D/2
    return torch.stack((re_ * w1 - im * w2, re_ * w2 + im * w1), dim=1).flatten(0, 2).to(weight.dtype)


def fold_value(weight: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """An output projection's weight with per-head value maps folded into its columns.

    Head ``h``'s columns ``W[:, hD:(h+1)D]`` become ``W[:, hD:(h+1)D] @ value[h].T``, so
    ``o_proj(o)`` equals ``o_proj`` of :meth:`kvroute.hf.attention.LayerMaps.map_output` ``(o)``.

    Args:
        weight: ``(hidden, H * D)`` output projection weight.
        value: ``(H, D, D)`` value maps.
    """
    heads, dim, _ = value.shape
    w = weight.float().unflatten(1, (heads, dim))  # (hidden, H, D)
    return torch.einsum("ohd,hed->ohe", w, value.float()).flatten(1).to(weight.dtype)


@dataclass(frozen=True)
class CalibrationFold:
    """One plan's calibration, as a served model applies it.

    Args:
        path: the calibration file.
        plan: the plan it calibrates.
        maps: the maps of each non-owner layer (float32, CPU).
        digest: mean ``|W_o|`` per layer of the weights it was fitted on.
    """

    path: Path
    plan: SharingPlan
    maps: dict[int, LayerMaps]
    digest: tuple[float, ...]

    @property
    def has_query_maps(self) -> bool:
        return any(m.query is not None for m in self.maps.values())

    def describe(self, query_at_run_time: bool | None = None) -> str:
        """One line for logs; ``query_at_run_time`` says where the query maps go, when known.

        Example: ``calibrated, 4 layers mapped, value maps folded into o_proj, query maps folded into q_proj``.
        """
        parts = [f"calibrated, {len(self.maps)} layers mapped"]
        if any(m.value is not None for m in self.maps.values()):
            parts.append("value maps folded into o_proj")
        if self.has_query_maps:
            parts.append({None: "query maps", True: "query maps applied after q_norm",
                          False: "query maps folded into q_proj"}[query_at_run_time])
        return ", ".join(parts)

    def fold(self, weights: Iterable[tuple[str, torch.Tensor]], queries: bool) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint weights (HF names) with the maps folded in, as vLLM loads them.

        Value maps fold into the ``o_proj`` weight of their layer; query maps into its
        ``q_proj`` weight and bias when ``queries`` (families without ``q_norm``; the
        others apply them at run time). Folding the whole checkpoint tensor, before vLLM
        shards it by heads, is exact under tensor parallelism.

        Raises:
            ValueError: once the weights are read, when a map found no weight to fold into
                or the weights are not the ones the calibration was fitted on.
        """
        from kvroute.calibration.store import check_digest, weight_digest

        todo = {(l, "o_proj") for l, m in self.maps.items() if m.value is not None}
        if queries:
            todo |= {(l, "q_proj") for l, m in self.maps.items() if m.query is not None}
        seen: dict[int, float] = {}
        for name, tensor in weights:
            match = _FOLD_WEIGHT.match(name)
            if match is not None:
                layer, part, kind = int(match["layer"]), match["part"], match["kind"]
                maps = self.maps.get(layer)
                if part == "o_proj" and kind == "weight":
                    seen[layer] = weight_digest(tensor)
                    if maps is not None and maps.value is not None:
                        tensor = fold_value(tensor, maps.value)
                        todo.discard((layer, part))
                elif part == "q_proj" and queries and maps is not None and maps.query is not None:
                    tensor = fold_query(tensor, maps.query)
                    todo.discard((layer, part))
            yield name, tensor
        if todo:
            missing = ", ".join(f"layers.{l}.self_attn.{p}.weight" for l, p in sorted(todo))
            raise ValueError(f"{self.path}: no checkpoint weight to fold the calibration into: {missing}")
        check_digest(self.path, list(self.digest), [seen.get(l) for l in range(len(self.digest))])


def plan_calibration(checkpoint: str | Path, config: Any, plan: SharingPlan) -> CalibrationFold | None:
    """The calibration of ``plan`` saved in a checkpoint folder, checked against the model.

    Args:
        checkpoint: the checkpoint folder (a hub id or a missing folder has none).
        config: the model config (a transformers config, or a ``config.json`` dict).
        plan: the plan served.

    Returns:
        The plan's calibration, or None when the folder holds none for it. Without one of its
        own, the pairwise maps (:mod:`kvroute.pairs`) when they cover every non-owner layer.

    Raises:
        ValueError: when the calibration file was fitted for another model (shape or
            layers), or its maps do not fit the plan.
    """
    folder = Path(checkpoint).expanduser()
    if not folder.is_dir():
        return None
    from kvroute.calibration.store import CALIBRATION_FILE, check_shape, read_calibration
    from kvroute.pairs import PAIRS_FILE, plan_maps, read_pair_maps

    config = as_config(config)
    meta, plans = read_calibration(folder)
    path, maps = folder / CALIBRATION_FILE, plans.get(plan.source)
    if plans:  # whichever plan is served, a file that does not fit the model is an error
        check_shape(path, meta.get("model", {}), config)
    if not maps:  # no calibration of its own: the pairwise maps, when they cover the plan
        meta, pairs = read_pair_maps(folder)
        path = folder / PAIRS_FILE
        if pairs:
            check_shape(path, meta.get("model", {}), config)
            maps = plan_maps(pairs, plan, meta["model"]["heads"])
    if not maps:
        return None
    saved = meta["model"]
    heads, dim = saved["heads"], saved["head_dim"]
    for layer, m in maps.items():
        if plan.source[layer] == layer:
            raise ValueError(f"{path}: plan {plan.spec} has maps for layer {layer}, which keeps its own KV")
        for name, tensor, want in (("query", m.query, (heads, dim // 2, 2)), ("value", m.value, (heads, dim, dim))):
            if tensor is not None and tuple(tensor.shape) != want:
                raise ValueError(f"{path}: layer {layer} {name} map has shape {tuple(tensor.shape)}, expected {want}")
    return CalibrationFold(path, plan, dict(sorted(maps.items())), tuple(saved.get("digest", ())))
