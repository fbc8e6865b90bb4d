"""Fitting a plan's calibration: data, activation capture, the closed-form fit, the refinement.

See :mod:`kvroute.calibrate` for what the maps are and how they are used.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from kvroute.calibration.maps import _attention_layers, _plan_maps, _running, remove_calibration
from kvroute.hf.attention import LayerMaps, RoutedAttention, apply_rope
from kvroute.plan import SharingPlan
from kvroute.precision import autocast as precision_autocast
from kvroute.router import route_key
from kvroute.data.text import read_texts
from kvroute.search import calibration_chunks
from kvroute.train.losses import next_token_losses

if TYPE_CHECKING:
    from kvroute.calibrate import CalibrationConfig

#: the ridges a value map's fit chooses from, on held-out chunks (relative to the Gram diagonal)
RIDGES = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


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


def calibration_chunks_of(data: Iterable[str | os.PathLike] | torch.Tensor, tokenizer: Any, tokens: int,
                          chunk_tokens: int, caller: str) -> torch.Tensor:
    """``data`` as ``(N, T)`` chunks: token ids given as such (checked), or text read with ``tokenizer``."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.shape[0] < 2:
            raise ValueError(f"calibration chunks must be (N >= 2, T) token ids, got shape {tuple(data.shape)}")
        return data
    if tokenizer is None:
        raise ValueError(f"{caller} needs the tokenizer to read text data")
    return calibration_data(tokenizer, data, tokens, chunk_tokens)


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


@torch.no_grad()  # not inference_mode: see kvroute.precision.autocast
def _capture(model: torch.nn.Module, plan: SharingPlan, chunks: torch.Tensor, batch_size: int,
             precision: str = "fp32") -> _Captured:
    """Each attention layer's inputs and RoPE under ``plan``; the passes run under ``precision``."""
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
        with _running(model, plan), precision_autocast(precision, device):
            for batch in chunks.split(batch_size):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return _Captured(
        [torch.cat(x) for x in inputs], [rope[i][0] for i in range(len(layers))], [rope[i][1] for i in range(len(layers))]
    )


# ---------------------------------------------------------------------- the closed-form fit
#: the query map is fitted on every QUERY_STRIDE-th query position: a sixteenth fits SmolLM2 as well as an
#: eighth did (same held-out loss) at half the cost
QUERY_STRIDE = 16


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
            stride = QUERY_STRIDE  # a share of the query positions is plenty (see QUERY_STRIDE)
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
        cap_full = _capture(model, SharingPlan.for_model("full", model.config), chunks, config.batch_size,
                            config.precision)
    layers = _attention_layers(model)
    key = route_key(plan.source)
    todo = [l for l in range(plan.num_layers) if plan.source[l] != l]
    owner_inputs: dict[int, torch.Tensor] = {}
    ridges: dict[int, float] = {}
    bar = tqdm(total=len(todo), desc=f"calibrate {plan.spec}", leave=False, disable=not progress)

    def fit_layer(module: RoutedAttention, idx: int, owner: int, hidden: torch.Tensor) -> None:
        dev = hidden.device
        fit = _LayerFit(module, layers[owner], cap_full.inputs[idx].to(dev), hidden, owner_inputs[owner],
                        cap_full.cos[idx].to(dev), cap_full.sin[idx].to(dev), train.shape[0], config)
        query = fit.query_map() if config.query else None
        value, ridges[idx] = fit.value_map(query)
        param = next(module.parameters())
        module.calibration[key] = LayerMaps(query, value).to(param.device)  # the layers after it see it

    def hook(idx: int):
        def f(module, args, kwargs):
            hidden = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach().float()
            owner = plan.source[idx]
            if owner == idx:
                owner_inputs[idx] = hidden
                return
            with torch.autocast(hidden.device.type, enabled=False):  # the fit itself runs in float32
                fit_layer(module, idx, owner, hidden)
            bar.update()
        return f

    remove_calibration(model, plan)
    handles = [att.register_forward_pre_hook(hook(i), with_kwargs=True) for i, att in enumerate(layers)]
    try:
        device = next(model.parameters()).device
        with torch.no_grad(), _running(model, plan), precision_autocast(config.precision, device):
            _decoder(model)(input_ids=chunks.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        bar.close()
    return ridges


# ------------------------------------------------------------------------ refinement
#: teacher logits kept for the refinement up to this size (bytes); past it they are recomputed each step
TEACHER_CACHE_BYTES = 4 << 30


class TeacherLogits:
    """The model's full-cache logits for the calibration chunks, computed once per chunk.

    The refinement's target does not depend on the plan, so one instance serves every plan
    of a :func:`kvroute.calibrate` call: each chunk's teacher pass runs once, not once per
    step that draws it. Logits are kept and returned in the dtype the forward returns (bf16
    under bf16 autocast, so they are exactly what a fresh pass would give); the loss
    normalises them chunk by chunk (:func:`kvroute.train.losses.next_token_losses`). Past
    ``max_bytes`` nothing is kept and every call recomputes.
    """

    def __init__(self, chunks: torch.Tensor, max_bytes: int = TEACHER_CACHE_BYTES) -> None:
        self.chunks = chunks
        self.max_bytes = max_bytes
        self._logits: dict[int, torch.Tensor] = {}

    def __call__(self, model: torch.nn.Module, index: list[int], autocast: Any) -> torch.Tensor:
        """Full-cache logits ``(B, T, V)`` for chunks ``index``, in the forward's dtype."""
        device = next(model.parameters()).device
        missing = [i for i in index if i not in self._logits]
        if missing:
            full = SharingPlan.for_model("full", model.config)
            with torch.no_grad(), _running(model, full), autocast:
                logits = model(input_ids=self.chunks[missing].to(device), use_cache=False).logits
            if self.chunks.shape[0] * logits[0].numel() * logits.element_size() > self.max_bytes:
                return logits
            self._logits.update(zip(missing, logits))
        return torch.stack([self._logits[i] for i in index])


def refine(
    model: torch.nn.Module,
    plan: SharingPlan,
    train: torch.Tensor,
    config: CalibrationConfig,
    progress: bool = True,
    teacher: TeacherLogits | None = None,
) -> None:
    """Train the attached maps of ``plan`` so the model under it matches its own full-cache outputs.

    The loss is KL(full-cache next-token distribution || the plan's), averaged over the positions
    that predict a next token (:func:`~kvroute.train.losses.next_token_losses`); only the maps
    train (the model's weights are frozen). ``teacher`` (built on ``train``) shares the
    full-cache passes between the plans of one call.
    """
    tensors = [t for m in _plan_maps(model, plan).values() for t in (m.query, m.value) if t is not None]
    if not tensors:
        return
    if teacher is None or teacher.chunks is not train:
        teacher = TeacherLogits(train)
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
            index = order[: config.batch_size]
            del order[: config.batch_size]
            batch = train[index].to(device)
            lr = config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))
            for group in optimizer.param_groups:
                group["lr"] = lr
            autocast = precision_autocast(config.precision, device)
            target = teacher(model, index, autocast)
            with _running(model, plan), autocast:
                student = model(input_ids=batch, use_cache=False).logits
            loss = next_token_losses(student, batch, target)[1]  # every position labelled
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
