"""Per-plan KV calibration: make a layer that reads another layer's KV behave like itself.

Under a plan, non-owner layer ``l`` attends with its own query to the keys and values
of owner ``o``. Calibration fits, for each such layer, two small maps
(:class:`kvroute.hf.attention.LayerMaps`) on calibration text, with no change to the
model's weights:

- **value map** (output-aware): per query head a ``D x D`` matrix ``M`` such that
  ``attn(q_l, k_o, v_o) @ M`` matches the layer's own full-cache attention output
  ``attn(q_l, k_l, v_l)``. Ridge least squares; the ridge is chosen per layer on
  held-out calibration chunks.
- **query map** (logit-aware, optional): per query head and RoPE frequency pair a
  complex scalar ``a`` such that the logits ``(a q_l) . k_o`` match the own logits
  ``q_l . k_l`` (centred per query, weighted by the own attention), so the layer attends
  where it did under the full cache. It commutes with RoPE. Fitted before the value map,
  which then sees the mapped queries.

The inputs of layer ``l`` and of its owner are taken under the plan (what they see at
deploy time), the targets under the full cache. Then, optionally (``steps > 0``),
every map of the plan is refined jointly by gradient descent so that the model's
next-token distribution under the plan matches its own under the full cache (KL); the
refinement is kept only if it lowers the loss on held-out chunks.

A calibration belongs to a (model, plan) pair. The maps live on the routed layers
(keyed by the plan's source map), so :func:`kvroute.set_plan` picks them up; the full
plan has no non-owner layers and is never changed. :func:`save_calibration` writes
them beside a checkpoint (``kvroute_calibration.safetensors``) and :func:`kvroute.load`
reads them back.

Example:
    >>> model = kvroute.load("runs/demo/rcla-mix-text/final")               # doctest: +SKIP
    >>> kvroute.calibrate(model, ["every:2", "every:4"], ["sotu/train"], tokenizer=tok)  # doctest: +SKIP
    >>> kvroute.set_plan(model, "every:2")   # calibrated                 # doctest: +SKIP
"""


from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from kvroute.calibration.fit import (  # noqa: F401  (re-exported: the calibration API in one place)
    RIDGES,
    TeacherLogits,
    _capture,
    _LayerFit,
    _split,
    calibration_chunks_of,
    calibration_data,
    fit_plan,
    refine,
)
from kvroute.calibration.maps import (  # noqa: F401
    _attach,
    _attention_layers,
    _plan_maps,
    _running,
    calibrated_sources,
    is_calibrated,
    remove_calibration,
)
from kvroute.calibration.store import (  # noqa: F401
    CALIBRATION_FILE,
    FORMAT_VERSION,
    _fingerprint,
    check_digest,
    check_shape,
    load_calibration,
    model_shape,
    read_calibration,
    save_calibration,
    weight_digest,
)
from kvroute.hf.attention import LayerMaps
from kvroute.hf.patch import get_router
from kvroute.plan import SharingPlan
from kvroute.precision import Precision, resolve_precision
from kvroute.router import route_key
from kvroute.data.text import read_texts
from kvroute.search import mean_loss

MIN_TOKENS = 512



@dataclass
class CalibrationConfig:
    """How to fit a calibration (defaults: the best measured on held-out SOTU, docs/RESULTS.md).

    Args:
        tokens: calibration tokens taken from the data (evenly spread over it).
        chunk_tokens: tokens per calibration sequence.
        val_fraction: share of the chunks held out to choose ridges and judge refinement.
        query: fit the logit-aware query map.
        value_maps: ``"head"`` (one value map per query head) or ``"group"`` (one per KV head).
        steps: end-to-end refinement steps (0: closed form only).
        lr: refinement learning rate (Adam, cosine decay).
        precision: ``"bf16"`` runs the model's forward passes (the captures, the sequential fit's
            pass and the refinement) under bfloat16 autocast (faster on CPUs with AMX and on GPUs; the
            fits themselves and the maps stay float32), ``"fp32"`` does not,
            ``"auto"`` picks bf16 where the hardware runs it natively (:mod:`kvroute.precision`).
        batch_size: chunks per forward pass (captures, losses, refinement; the sequential fit
            runs all chunks in one pass, so each layer is fitted on all of them).
        seed: order of the refinement batches.
    """

    tokens: int = 8192
    chunk_tokens: int = 256
    val_fraction: float = 0.125
    query: bool = True
    value_maps: str = "head"
    steps: int = 0
    lr: float = 1e-3
    precision: Precision = "auto"
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.chunk_tokens < 8:
            raise ValueError(f"--chunk-tokens must be at least 8, got {self.chunk_tokens}")
        if self.tokens < max(MIN_TOKENS, 2 * self.chunk_tokens):
            raise ValueError(
                f"--tokens {self.tokens} is too few to calibrate: give at least "
                f"{max(MIN_TOKENS, 2 * self.chunk_tokens)} (8192 is the default)"
            )
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"--val-fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.value_maps not in ("head", "group"):
            raise ValueError(f"--value-maps must be 'head' or 'group', got {self.value_maps!r}")
        if self.steps < 0:
            raise ValueError(f"--steps must be >= 0, got {self.steps}")
        resolve_precision(self.precision, "cpu")  # checks the name
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.batch_size <= 0:
            raise ValueError(f"--batch-size must be positive, got {self.batch_size}")


@dataclass
class PlanCalibration:
    """What was fitted for one plan, and how it scored on the held-out calibration chunks."""

    plan: str
    source: tuple[int, ...]
    layers: int
    loss_full: float
    loss_plain: float
    loss_closed_form: float
    loss: float
    refined: bool = False
    seconds: float = 0.0
    ridges: dict[int, float] = field(default_factory=dict)
    #: False when pairwise maps served the plan better on the held-out chunks than this fit: the
    #: fit is then dropped, the pairs serve the plan, and ``loss`` is ``loss_plain``
    kept: bool = True

    def summary(self) -> str:
        ppl = lambda x: f"{math.exp(x):,.1f}" if x < 50 else "inf"  # noqa: E731
        verdict = (f"{self.layers} layers mapped" if self.kept else
                   "not kept: the pairwise maps scored better")
        return (
            f"{self.plan}: held-out calibration ppl {ppl(self.loss_plain)} -> {ppl(self.loss)} "
            f"(full cache {ppl(self.loss_full)}; closed form {ppl(self.loss_closed_form)}"
            f"{', refined' if self.refined else ''}), {verdict}, {self.seconds:.0f} s"
        )


def calibrate(
    model: torch.nn.Module,
    plans: Iterable[SharingPlan | str] | str,
    data: Iterable[str | os.PathLike] | torch.Tensor,
    config: CalibrationConfig | None = None,
    tokenizer: Any = None,
    progress: bool = True,
) -> list[PlanCalibration]:
    """Fit and attach a calibration for every plan given; ``full`` is skipped (nothing to fit).

    Where pairwise maps (:mod:`kvroute.pairs`) already serve a plan, its fit is kept only if it
    lowers the loss on the held-out calibration chunks below the pairs' (trained pairs can beat
    a closed-form fit from scratch); otherwise it is dropped and ``kept`` is False.

    Args:
        model: a routed model (:func:`kvroute.load` or :func:`kvroute.apply`).
        plans: plan specs (``"every:2,every:4"`` or a list) or plans.
        data: text files/folders, or ``(N, T)`` token ids already cut into chunks.
        config: how to fit (default :class:`CalibrationConfig`).
        tokenizer: needed when ``data`` is text.

    Returns:
        One :class:`PlanCalibration` per plan calibrated, with held-out losses.

    Example:
        >>> kvroute.calibrate(model, "every:2", ["sotu/"], tokenizer=tok)  # doctest: +SKIP
    """
    from kvroute.plan import parse_plan_list

    config = config or CalibrationConfig()
    specs = parse_plan_list(plans) if isinstance(plans, str) else list(plans)
    resolved = [SharingPlan.for_model(p, model.config) for p in specs]  # all checked before any work
    chunks = calibration_chunks_of(data, tokenizer, config.tokens, config.chunk_tokens, "calibrate()")
    train, val = _split(chunks, config.val_fraction)
    full = SharingPlan.for_model("full", model.config)
    cap_full, loss_full = None, None
    teacher = TeacherLogits(train)  # shared by every plan's refinement
    results = []
    for plan in resolved:
        if plan.is_full:
            continue
        start = time.perf_counter()
        remove_calibration(model, plan)
        pairs_serve = is_calibrated(model, plan)  # pairwise maps cover every non-owner layer of the plan
        if loss_full is None:  # calibrations never change `full`: one pass serves every plan
            with _running(model, full):
                loss_full = mean_loss(model, val, config.batch_size)
        with _running(model, plan):
            loss_plain = mean_loss(model, val, config.batch_size)
        if cap_full is None:
            cap_full = _capture(model, full, torch.cat([train, val]), config.batch_size, config.precision)
        try:
            ridges = fit_plan(model, plan, train, val, config, cap_full, progress)
        except BaseException:
            remove_calibration(model, plan)  # never leave a half-fitted plan behind
            raise
        maps = _plan_maps(model, plan)
        with _running(model, plan):
            loss_closed = mean_loss(model, val, config.batch_size)
        loss, refined = loss_closed, False
        if config.steps:
            snapshot = {k: (m.query.clone() if m.query is not None else None, m.value.clone())
                        for k, m in maps.items()}
            closed_form = lambda: _attach(model, plan.source, {k: LayerMaps(*v) for k, v in snapshot.items()})  # noqa: E731
            try:
                refine(model, plan, train, config, progress, teacher)
            except BaseException:  # an interrupted refinement leaves the closed form, not half-trained maps
                closed_form()
                raise
            with _running(model, plan):
                loss_refined = mean_loss(model, val, config.batch_size)
            if loss_refined < loss_closed:
                loss, refined = loss_refined, True
            else:  # refinement did not generalise: keep the closed form
                closed_form()
        kept = not pairs_serve or loss < loss_plain  # a fit that loses to the plan's pairwise maps is dropped
        if not kept:
            remove_calibration(model, plan)
            loss = loss_plain
        result = PlanCalibration(plan.spec, plan.source, len(maps), loss_full, loss_plain, loss_closed, loss,
                                 refined, time.perf_counter() - start, ridges, kept)
        results.append(result)
        if kept:
            _record(model, plan, result, config)
        if progress:
            print(result.summary(), flush=True)
    return results


def _record(model: torch.nn.Module, plan: SharingPlan, result: PlanCalibration, config: CalibrationConfig) -> None:
    get_router(model).calibration_info[route_key(plan.source)] = {"plan": plan.spec, "source": list(plan.source),
                                    "result": {k: v for k, v in asdict(result).items() if k != "ridges"},
                                    "config": asdict(config)}


def calibrate_checkpoint(
    checkpoint: str | os.PathLike,
    plans: str | list[str],
    data: list[str],
    config: CalibrationConfig | None = None,
    out: str | os.PathLike | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    progress: bool = True,
    pairs: bool = False,
) -> tuple[Path, list[Any]]:
    """Load a checkpoint, calibrate it for ``plans`` and save the result (what ``kvroute calibrate`` does).

    Args:
        out: a new checkpoint folder (weights, tokenizer, calibration); default: write only the
            calibration file into ``checkpoint`` itself, which must then be a local folder.
        pairs: fit pairwise maps (:func:`kvroute.pairs.fit_pair_maps`) instead of per-plan
            maps; ``plans`` are then the plans whose held-out loss is reported.

    Returns:
        The folder written and one :class:`PlanCalibration` per plan (with ``pairs``, the one
        :class:`kvroute.pairs.PairFit`).
    """
    from kvroute.hf.patch import apply
    from kvroute.models import check_source, load_config, load_model, load_tokenizer, save_checkpoint
    from kvroute.plan import parse_plan_list

    config = config or CalibrationConfig()
    check_source(checkpoint)
    folder = Path(str(checkpoint))
    if out is None and not (folder.is_dir() and (folder / "config.json").is_file()):
        raise ValueError(f"{checkpoint} is not a local checkpoint folder; give --out to write a new one")
    specs = parse_plan_list(plans) if isinstance(plans, str) else list(plans)
    model_config = load_config(checkpoint)
    for spec in specs:  # every plan checked before any work
        SharingPlan.for_model(spec, model_config)
    read_texts(data)  # missing files fail now, not after the model is loaded
    tokenizer = load_tokenizer(checkpoint)
    model = apply(load_model(checkpoint, dtype=dtype, device=device)).eval()
    from kvroute.pairs import fit_pair_maps, load_pair_maps, save_pair_maps

    if folder.is_dir():
        for kind, reload in (("calibration", load_calibration), ("pairwise maps", load_pair_maps)):
            try:
                reload(model, folder)  # kept: calibrations of other plans, and the other kind
            except ValueError as err:  # a stale file is what this call replaces
                warnings.warn(f"kvroute calibrate: dropping the old {kind}: {err}", stacklevel=2)
    if pairs:
        results: list[Any] = [fit_pair_maps(model, data, config, tokenizer, specs, progress)]
    else:
        results = calibrate(model, specs, data, config, tokenizer=tokenizer, progress=progress)
    if out is not None:
        return save_checkpoint(model, out, tokenizer), results
    save_calibration(model, folder)
    save_pair_maps(model, folder)
    return folder, results
