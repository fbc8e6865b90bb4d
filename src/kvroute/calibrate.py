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
    >>> model = kvroute.load("runs/demo/rcla/final")                      # doctest: +SKIP
    >>> kvroute.calibrate(model, ["every:2", "every:4"], ["sotu/train"], tokenizer=tok)  # doctest: +SKIP
    >>> kvroute.set_plan(model, "every:2")   # calibrated                 # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvroute.hf.attention import LayerMaps, RoutedAttention, apply_rope
from kvroute.hf.patch import get_router
from kvroute.plan import KVShape, SharingPlan
from kvroute.precision import autocast as precision_autocast
from kvroute.precision import resolve_precision
from kvroute.router import parse_route_key, route_key
from kvroute.search import calibration_chunks, mean_loss, read_texts

CALIBRATION_FILE = "kvroute_calibration.safetensors"
FORMAT_VERSION = 1
RIDGES = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
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
        precision: ``"bf16"`` runs the refinement's forward passes under bfloat16 autocast
            (about 2x faster on CPUs with AMX and on GPUs; the maps stay float32), ``"fp32"`` does not,
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
    precision: str = "auto"
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

    def summary(self) -> str:
        ppl = lambda x: f"{math.exp(x):,.1f}" if x < 50 else "inf"  # noqa: E731
        return (
            f"{self.plan}: held-out calibration ppl {ppl(self.loss_plain)} -> {ppl(self.loss)} "
            f"(full cache {ppl(self.loss_full)}; closed form {ppl(self.loss_closed_form)}"
            f"{', refined' if self.refined else ''}), {self.layers} layers mapped, {self.seconds:.0f} s"
        )


# ---------------------------------------------------------------------- the maps on a model
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


# ---------------------------------------------------------------------------- data
def calibration_data(
    tokenizer: Any, data: Iterable[str | os.PathLike], tokens: int, chunk_tokens: int
) -> torch.Tensor:
    """``(N, chunk_tokens)`` token ids: ``tokens`` tokens evenly spread over the texts of ``data``."""
    wanted = tokens // chunk_tokens
    chunks = calibration_chunks(tokenizer, read_texts(data), chunk_tokens, max_chunks=wanted)
    if chunks.shape[0] < max(2, wanted // 2):
        raise ValueError(
            f"calibration data has {chunks.numel()} tokens, fewer than half the {tokens} asked for; "
            "give more text or a smaller --tokens"
        )
    return chunks


def _split(chunks: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Every k-th chunk is held out, so both parts span the whole text."""
    n_val = max(1, round(chunks.shape[0] * val_fraction))
    step = chunks.shape[0] / n_val
    val_idx = sorted({min(int(i * step + step / 2), chunks.shape[0] - 1) for i in range(n_val)})
    train_idx = [i for i in range(chunks.shape[0]) if i not in set(val_idx)]
    return chunks[train_idx], chunks[val_idx]


# ------------------------------------------------------------------------ capture
@dataclass
class _Captured:
    """Per layer: the attention module's input ``(N, T, hidden)`` and its RoPE ``(1, T, D)`` cos/sin."""

    inputs: list[torch.Tensor]
    cos: list[torch.Tensor]
    sin: list[torch.Tensor]


@torch.inference_mode()
def _capture(model: torch.nn.Module, plan: SharingPlan, chunks: torch.Tensor, batch_size: int) -> _Captured:
    layers = _attention_layers(model)
    inputs: list[list[torch.Tensor]] = [[] for _ in layers]
    rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(idx: int):
        def f(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            inputs[idx].append(hidden.detach().float().cpu())
            if idx not in rope:
                cos, sin = kwargs["position_embeddings"]
                rope[idx] = (cos[:1].detach().float(), sin[:1].detach().float())
        return f

    handles = [att.register_forward_pre_hook(hook(i), with_kwargs=True) for i, att in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        with _running(model, plan):
            for batch in chunks.split(batch_size):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return _Captured(
        [torch.cat(x) for x in inputs], [rope[i][0] for i in range(len(layers))], [rope[i][1] for i in range(len(layers))]
    )


# ---------------------------------------------------------------------- the closed-form fit
def _heads(att: RoutedAttention, x: torch.Tensor, proj: torch.nn.Module, norm: torch.nn.Module | None) -> torch.Tensor:
    """(B, T, hidden) -> (B, H, T, D) in float32, before RoPE."""
    dtype = next(att.parameters()).dtype
    out = proj(x.to(dtype)).view(*x.shape[:-1], -1, att.head_dim)
    if norm is not None:
        out = norm(out)
    return out.transpose(1, 2).float()


def _mask(att: RoutedAttention, T: int, device: torch.device) -> torch.Tensor:
    """(T, T) additive mask: causal, and the layer's sliding window where it has one."""
    t = torch.arange(T, device=device)
    allowed = t[None, :] <= t[:, None]
    window = att.sliding_window if _is_sliding(att) else None
    if window:
        allowed &= (t[:, None] - t[None, :]) < window
    return torch.zeros(T, T, device=device).masked_fill(~allowed, float("-inf"))


def _is_sliding(att: RoutedAttention) -> bool:
    types = getattr(att.config, "layer_types", None)
    if types is not None:
        return types[att.layer_idx] == "sliding_attention"
    return bool(att.sliding_window)


def _logits(att: RoutedAttention, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q: (B, H, T, D), k: (B, H_kv, T, D) -> (B, H, T, T) masked logits."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q @ k.transpose(-1, -2)) * att.scaling
    if att.softcap:
        logits = torch.tanh(logits / att.softcap) * att.softcap
    return logits + mask


def _attend(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """probs: (B, H, T, T), v: (B, H_kv, T, D) -> (B, H, T, D)."""
    return probs @ v.repeat_interleave(probs.shape[1] // v.shape[1], dim=1)


def _rotate(q: torch.Tensor, a: torch.Tensor | None) -> torch.Tensor:
    return q if a is None else LayerMaps(a, None).map_query(q)


class _LayerFit:
    """The closed-form fit of one non-owner layer ``l`` reading owner ``o``.

    Args:
        xf_l: layer l's attention input under the full cache (the targets), ``(N, T, hidden)``.
        xp_l, xp_o: the inputs of layer l and of its owner under the plan.
        cos, sin: layer l's RoPE, ``(1, T, D)``.
        n_train: the first ``n_train`` chunks fit the maps; the rest choose the ridge.
    """

    def __init__(self, att_l: RoutedAttention, att_o: RoutedAttention, xf_l: torch.Tensor, xp_l: torch.Tensor,
                 xp_o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_train: int,
                 config: CalibrationConfig) -> None:
        self.att_l, self.att_o, self.config = att_l, att_o, config
        self.xf_l, self.xp_l, self.xp_o = xf_l, xp_l, xp_o
        self.cos, self.sin = cos, sin
        self.train, self.val = slice(0, n_train), slice(n_train, xf_l.shape[0])
        self.H = att_l.config.num_attention_heads
        self.D = att_l.head_dim
        self.mask = _mask(att_l, self.xf_l.shape[1], xp_l.device)

    def _batches(self, part: slice) -> Iterator[tuple[torch.Tensor, ...]]:
        """Per batch of chunks: own q, k, v (full cache) and plan q (pre-RoPE), owner k, v (plan)."""
        att_l, att_o, bs = self.att_l, self.att_o, self.config.batch_size
        idx = range(part.start, part.stop)
        for s in range(idx.start, idx.stop, bs):
            e = min(s + bs, idx.stop)
            xf, xp, xo = self.xf_l[s:e], self.xp_l[s:e], self.xp_o[s:e]
            cos, sin = self.cos, self.sin
            q_own = apply_rope(_heads(att_l, xf, att_l.q_proj, att_l.q_norm), cos, sin)
            k_own = apply_rope(_heads(att_l, xf, att_l.k_proj, att_l.k_norm), cos, sin)
            v_own = _heads(att_l, xf, att_l.v_proj, None)
            q_plan = _heads(att_l, xp, att_l.q_proj, att_l.q_norm)
            k_o = apply_rope(_heads(att_o, xo, att_o.k_proj, att_o.k_norm), cos, sin)
            v_o = _heads(att_o, xo, att_o.v_proj, None)
            yield q_own, k_own, v_own, q_plan, k_o, v_o

    @torch.no_grad()
    def query_map(self) -> torch.Tensor:
        """(H, D/2, 2): per head and RoPE pair, the complex scalar whose logits best match the own ones."""
        H, D, half = self.H, self.D, self.D // 2
        gram = torch.zeros(H, D, D, dtype=torch.float64)
        rhs = torch.zeros(H, D, dtype=torch.float64)
        for q_own, k_own, _, q_plan, k_o, _ in self._batches(self.train):
            stride = 8  # an eighth of the query positions is plenty, and 8x cheaper
            target = _logits(self.att_l, q_own, k_own, self.mask)[:, :, ::stride]  # (B, H, T', S)
            allowed = (self.mask[::stride] == 0).float()                        # (T', S)
            weight = 0.5 * target.softmax(-1) + 0.5 * allowed / allowed.sum(-1, keepdim=True)  # own attention + uniform
            q = apply_rope(q_plan, self.cos, self.sin)[:, :, ::stride]  # (B, H, T', D)
            k = k_o.repeat_interleave(H // k_o.shape[1], dim=1)           # (B, H, S, D)
            zq = torch.complex(q[..., :half], q[..., half:])
            zk = torch.complex(k[..., :half], k[..., half:])
            # logit(a) = scaling * Re(sum_f a_f * w_f),  w_f = zq_f * conj(zk_f): linear in (Re a, Im a)
            w = zq.unsqueeze(3) * zk.conj().unsqueeze(2) * self.att_l.scaling          # (B, H, T', S, F)
            feats = torch.cat((w.real, -w.imag), dim=-1)                              # (B, H, T', S, D)
            tgt = torch.where(weight > 0, target, torch.zeros_like(target))
            feats = feats - (weight.unsqueeze(-1) * feats).sum(3, keepdim=True)       # centred per query
            tgt = tgt - (weight * tgt).sum(-1, keepdim=True)
            sw = weight.sqrt().unsqueeze(-1)
            f = (feats * sw).transpose(0, 1).reshape(H, -1, D)
            t = (tgt.unsqueeze(-1) * sw).transpose(0, 1).reshape(H, -1)
            gram += (f.transpose(1, 2) @ f).double().cpu()  # float32 products, float64 sums over batches
            rhs += (f.transpose(1, 2) @ t.unsqueeze(-1)).squeeze(-1).double().cpu()
        ridge = 1e-6 * gram.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(D, dtype=torch.float64)
        sol = torch.linalg.solve(gram + ridge, rhs).float()  # (H, D): Re parts, then Im parts
        return torch.stack((sol[:, :half], sol[:, half:]), dim=-1)

    @torch.no_grad()
    def value_map(self, query: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        """(H, D, D) output-aware value maps, with the ridge that does best on the held-out chunks."""
        H, D = self.H, self.D
        group = H // self.att_l.config.num_key_value_heads if self.config.value_maps == "group" else 1
        stats = {}
        for name, part in (("train", self.train), ("val", self.val)):
            gram = torch.zeros(H // group, D, D, dtype=torch.float64)
            cross = torch.zeros(H // group, D, D, dtype=torch.float64)
            yy = torch.zeros(H // group, dtype=torch.float64)
            for q_own, k_own, v_own, q_plan, k_o, v_o in self._batches(part):
                target = _attend(_logits(self.att_l, q_own, k_own, self.mask).softmax(-1), v_own)  # (B, H, T, D)
                q = apply_rope(_rotate(q_plan, query), self.cos, self.sin)
                x = _attend(_logits(self.att_l, q, k_o, self.mask).softmax(-1), v_o)              # (B, H, T, D)
                x = x.transpose(0, 1).reshape(H // group, -1, D)
                y = target.transpose(0, 1).reshape(H // group, -1, D)
                gram += (x.transpose(1, 2) @ x).double().cpu()
                cross += (x.transpose(1, 2) @ y).double().cpu()
                yy += (y * y).sum((1, 2)).double().cpu()
            stats[name] = (gram, cross, yy)
        gram, cross, _ = stats["train"]
        vgram, vcross, vyy = stats["val"]
        scale = gram.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(D, dtype=torch.float64)
        best = None
        for ridge in RIDGES:
            m = torch.linalg.solve(gram + ridge * scale, cross)  # (H', D, D)
            err = (torch.einsum("hij,hik,hkj->h", m, vgram, m) - 2 * torch.einsum("hij,hij->h", m, vcross) + vyy).sum()
            if best is None or err < best[0]:
                best = (err, ridge, m)
        _, ridge, m = best
        return m.float().repeat_interleave(group, dim=0), ridge


def fit_plan(
    model: torch.nn.Module,
    plan: SharingPlan,
    train: torch.Tensor,
    val: torch.Tensor,
    config: CalibrationConfig,
    cap_full: _Captured | None = None,
    progress: bool = True,
) -> dict[int, float]:
    """Fit and attach the closed-form maps of every non-owner layer of ``plan``, in layer order.

    One forward pass under the plan over all chunks: just before each non-owner layer runs,
    its maps are fitted on the inputs it really gets (earlier layers already calibrated) and
    attached, so the layers after it see its calibrated output.

    Returns:
        The ridge chosen for each layer.
    """
    from kvroute.hf.patch import _decoder

    chunks = torch.cat([train, val])
    if cap_full is None:
        cap_full = _capture(model, SharingPlan.for_model("full", model.config), chunks, config.batch_size)
    layers = _attention_layers(model)
    key = route_key(plan.source)
    todo = [l for l in range(plan.num_layers) if plan.source[l] != l]
    owner_inputs: dict[int, torch.Tensor] = {}
    ridges: dict[int, float] = {}
    bar = tqdm(total=len(todo), desc=f"calibrate {plan.spec}", leave=False, disable=not progress)

    def hook(idx: int):
        def f(module, args, kwargs):
            hidden = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach().float()
            owner = plan.source[idx]
            if owner == idx:
                owner_inputs[idx] = hidden
                return
            dev = hidden.device
            fit = _LayerFit(module, layers[owner], cap_full.inputs[idx].to(dev), hidden, owner_inputs[owner],
                            cap_full.cos[idx].to(dev), cap_full.sin[idx].to(dev), train.shape[0], config)
            query = fit.query_map() if config.query else None
            value, ridges[idx] = fit.value_map(query)
            param = next(module.parameters())
            module.calibration[key] = LayerMaps(query, value).to(param.device)  # the layers after it see it
            bar.update()
        return f

    remove_calibration(model, plan)
    handles = [att.register_forward_pre_hook(hook(i), with_kwargs=True) for i, att in enumerate(layers)]
    try:
        with torch.no_grad(), _running(model, plan):
            _decoder(model)(input_ids=chunks.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        bar.close()
    return ridges


# ------------------------------------------------------------------------ refinement
def refine(
    model: torch.nn.Module,
    plan: SharingPlan,
    train: torch.Tensor,
    config: CalibrationConfig,
    progress: bool = True,
) -> None:
    """Train the attached maps of ``plan`` so the model under it matches its own full-cache outputs.

    The loss is KL(full-cache next-token distribution || the plan's), averaged over positions;
    only the maps train (the model's weights are frozen).
    """
    tensors = [t for m in _plan_maps(model, plan).values() for t in (m.query, m.value) if t is not None]
    if not tensors:
        return
    full = SharingPlan.for_model("full", model.config)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for t in tensors:
        t.requires_grad_(True)
    optimizer = torch.optim.Adam(tensors, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    device = next(model.parameters()).device
    order: list[int] = []
    try:
        bar = tqdm(range(config.steps), desc=f"refine {plan.spec}", leave=False, disable=not progress)
        for step in bar:
            if len(order) < config.batch_size:
                order += torch.randperm(train.shape[0], generator=generator).tolist()
            batch = train[order[: config.batch_size]].to(device)
            del order[: config.batch_size]
            lr = config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))
            for group in optimizer.param_groups:
                group["lr"] = lr
            autocast = precision_autocast(config.precision, device)
            with torch.no_grad(), _running(model, full), autocast:
                teacher = model(input_ids=batch, use_cache=False).logits.float().log_softmax(-1)
            with _running(model, plan), autocast:
                student = model(input_ids=batch, use_cache=False).logits.float().log_softmax(-1)
            loss = F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(kl=f"{loss.item():.3f}")
    finally:
        for t in tensors:
            t.requires_grad_(False)
            t.grad = None
        for p in frozen:
            p.requires_grad_(True)


# ---------------------------------------------------------------------------- public
def calibrate(
    model: torch.nn.Module,
    plans: Iterable[SharingPlan | str] | str,
    data: Iterable[str | os.PathLike] | torch.Tensor,
    config: CalibrationConfig | None = None,
    tokenizer: Any = None,
    progress: bool = True,
) -> list[PlanCalibration]:
    """Fit and attach a calibration for every plan given; ``full`` is skipped (nothing to fit).

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
    if isinstance(data, torch.Tensor):
        chunks = data
        if chunks.dim() != 2 or chunks.shape[0] < 2:
            raise ValueError(f"calibration chunks must be (N >= 2, T) token ids, got shape {tuple(chunks.shape)}")
    else:
        if tokenizer is None:
            raise ValueError("calibrate() needs the tokenizer to read text data")
        chunks = calibration_data(tokenizer, data, config.tokens, config.chunk_tokens)
    train, val = _split(chunks, config.val_fraction)
    full = SharingPlan.for_model("full", model.config)
    cap_full = None
    results = []
    for plan in resolved:
        if plan.is_full:
            continue
        start = time.perf_counter()
        remove_calibration(model, plan)
        with _running(model, full):
            loss_full = mean_loss(model, val, config.batch_size)
        with _running(model, plan):
            loss_plain = mean_loss(model, val, config.batch_size)
        if cap_full is None:
            cap_full = _capture(model, full, torch.cat([train, val]), config.batch_size)
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
                refine(model, plan, train, config, progress)
            except BaseException:  # an interrupted refinement leaves the closed form, not half-trained maps
                closed_form()
                raise
            with _running(model, plan):
                loss_refined = mean_loss(model, val, config.batch_size)
            if loss_refined < loss_closed:
                loss, refined = loss_refined, True
            else:  # refinement did not generalise: keep the closed form
                closed_form()
        result = PlanCalibration(plan.spec, plan.source, len(maps), loss_full, loss_plain, loss_closed, loss,
                                 refined, time.perf_counter() - start, ridges)
        results.append(result)
        _record(model, plan, result, config)
        if progress:
            print(result.summary(), flush=True)
    return results


# ------------------------------------------------------------------------ persistence
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


def _record(model: torch.nn.Module, plan: SharingPlan, result: PlanCalibration, config: CalibrationConfig) -> None:
    get_router(model).calibration_info[route_key(plan.source)] = {"plan": plan.spec, "source": list(plan.source),
                                    "result": {k: v for k, v in asdict(result).items() if k != "ridges"},
                                    "config": asdict(config)}


def save_calibration(model: torch.nn.Module, folder: str | os.PathLike) -> Path | None:
    """Write every calibration the model holds to ``folder/kvroute_calibration.safetensors`` (atomically).

    Returns:
        The file written, or None when the model holds no calibration (an old file is removed).
    """
    from safetensors.torch import save_file

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
    if not tensors:
        path.unlink(missing_ok=True)
        return None
    meta = {"version": FORMAT_VERSION, "model": _fingerprint(model), "plans": plans}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"kvroute": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def read_calibration(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[tuple[int, ...], dict[int, LayerMaps]]]:
    """Read ``folder/kvroute_calibration.safetensors`` without a model (vLLM folds it at load).

    Returns:
        ``(meta, maps)``: the file's metadata (``model`` fingerprint, ``plans`` info) and, per plan
        source map, the :class:`LayerMaps` (float32, CPU) of each non-owner layer. Both empty when
        the folder has no calibration.
    """
    from safetensors import safe_open

    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        return {}, {}
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("kvroute", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported calibration format {meta.get('version')!r} (expected {FORMAT_VERSION})")
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
