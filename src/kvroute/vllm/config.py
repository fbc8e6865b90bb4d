"""What a served model reads from its config: the routed architecture and the plan.

The plan travels in the model config (``kvroute_plan``, set through vLLM's
``hf_overrides``), so spawned workers see it without any environment variable.
:func:`resolve_plan` reads it: the serve-time ``kvroute_plan`` if given, else the plan
saved in the checkpoint's ``kvroute`` entry, else ``full`` with a warning.

Pure Python: nothing here needs vLLM.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from kvroute.plan import SharingPlan
from kvroute.router import CONFIG_KEY

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
    config = as_config(config)
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
    config = as_config(config)
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
    config = as_config(config)
    types = set(getattr(config, "layer_types", None) or [])
    if getattr(config, "model_type", None) in ("qwen2", "qwen3") and len(types) > 1:
        raise ValueError(
            f"vLLM serves {config.model_type} with a sliding window on every layer or on none; this config "
            f"mixes {sorted(types)} (use_sliding_window with max_window_layers > 0)"
        )


def read_config(checkpoint: str | Path) -> dict[str, Any]:
    """A checkpoint folder's ``config.json``.

    Raises:
        FileNotFoundError: for a missing folder or a folder without ``config.json``.
    """
    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    return json.loads(config_file.read_text())


def as_config(config: Any) -> Any:
    """A ``config.json`` dict as an attribute namespace; a config object as it is."""
    if isinstance(config, dict):
        return SimpleNamespace(**config)
    return config
