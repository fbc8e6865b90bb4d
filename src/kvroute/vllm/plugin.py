"""The plugin: registration of the routed architectures, and the overrides that serve a checkpoint routed.

vLLM finds :func:`register` through the ``vllm.general_plugins`` entry point and calls it
in every process it starts (API server, engine, spawned workers). Registration adds
*routed* architectures next to vLLM's own, so a plain Llama served by vLLM is untouched;
a checkpoint is served routed when its architecture is overridden to the routed one,
which :func:`hf_overrides` (and ``kvroute serve``) does.

Nothing here imports vLLM until :func:`register` runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvroute.plan import KVShape, SharingPlan
from kvroute.policy import policy_from_dict
from kvroute.router import CONFIG_KEY
from kvroute.vllm.config import (
    PLAN_KEY,
    ROUTED_ARCHITECTURES,
    as_config,
    check_windows,
    read_config,
    resolve_plan,
    routed_architecture,
)
from kvroute.vllm.weights import plan_calibration

#: Routed vLLM architecture -> ``module:class`` of the model class that serves it.
MODEL_CLASSES: dict[str, str] = {
    "KVRouteLlamaForCausalLM": "kvroute.vllm.llama:KVRouteLlamaForCausalLM",
    "KVRouteMistralForCausalLM": "kvroute.vllm.llama:KVRouteMistralForCausalLM",
    "KVRouteQwen2ForCausalLM": "kvroute.vllm.qwen:KVRouteQwen2ForCausalLM",
    "KVRouteQwen3ForCausalLM": "kvroute.vllm.qwen:KVRouteQwen3ForCausalLM",
    "KVRouteGemma3ForCausalLM": "kvroute.vllm.gemma3:KVRouteGemma3ForCausalLM",
}


def register() -> None:
    """Register the routed architectures with vLLM (the ``vllm.general_plugins`` entry point).

    Classes are registered lazily by name, so this imports no model code.
    """
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for routed in ROUTED_ARCHITECTURES.values():
        if routed not in supported:
            ModelRegistry.register_model(routed, MODEL_CLASSES[routed])


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

    Example:
        >>> from vllm import LLM  # doctest: +SKIP
        >>> llm = LLM("runs/rcla/final", hf_overrides=hf_overrides("runs/rcla/final", plan="every:4"))  # doctest: +SKIP
    """
    config = read_config(checkpoint)
    arch = routed_architecture(config)
    check_windows(config)
    resolved = resolve_plan(config, plan)
    plan_calibration(checkpoint, config, resolved)
    return {"architectures": [arch], PLAN_KEY: resolved.spec}


def describe_serving(checkpoint: str | Path, plan: SharingPlan | str | None = None) -> str:
    """One line on what ``checkpoint`` serves: the plan, whether it is calibrated, and a warning when
    the model was fine-tuned for other plans only (``plan:SPEC`` routing).

    Raises:
        ValueError: for a plan or a calibration that does not fit the model.
    """
    config = read_config(checkpoint)
    resolved = resolve_plan(config, plan)
    calibration = plan_calibration(checkpoint, config, resolved)
    line = f"{resolved.describe()}; {calibration.describe() if calibration else 'not calibrated'}"
    policy = (config.get(CONFIG_KEY) or {}).get("policy")
    shape = KVShape.from_config(as_config(config))
    served = policy_from_dict(policy).served_plans(shape.num_layers, shape.layer_types) if policy else ()
    if served and all(p.source != resolved.source for p in served):
        names = " and ".join(repr(p.spec) for p in served)
        line += f"; WARNING: fine-tuned for plan {names} only, expect it to be much worse under {resolved.spec!r}"
    return line
