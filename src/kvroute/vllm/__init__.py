"""Serve kvroute checkpoints with vLLM: everything that touches vLLM lives in this package.

vLLM finds the plugin through the ``vllm.general_plugins`` entry point
(:func:`kvroute.vllm.plugin.register`). A checkpoint is served routed when its
architecture is overridden to the routed one, which :func:`hf_overrides` (and
``kvroute serve``) does::

    from vllm import LLM
    from kvroute.vllm import hf_overrides

    llm = LLM("runs/rcla/final", hf_overrides=hf_overrides("runs/rcla/final", plan="every:4"))

Modules:

- :mod:`~kvroute.vllm.config`: the routed architectures and the plan a served model reads;
- :mod:`~kvroute.vllm.plugin`: registration with vLLM, ``hf_overrides``;
- :mod:`~kvroute.vllm.server`: the server command and its KV pool;
- :mod:`~kvroute.vllm.weights`: weight routing and calibration folding (pure torch);
- :mod:`~kvroute.vllm.layers`: the attention of a layer that keeps no KV;
- :mod:`~kvroute.vllm.llama`, :mod:`~kvroute.vllm.qwen`, :mod:`~kvroute.vllm.gemma3`:
  the routed model classes, one module per family.

Importing this package needs no vLLM; only ``register`` and the model modules do.
"""

from kvroute.vllm.config import PLAN_KEY, ROUTED_ARCHITECTURES, check_windows, resolve_plan, routed_architecture
from kvroute.vllm.plugin import describe_serving, hf_overrides, register
from kvroute.vllm.server import (
    available_memory,
    default_kv_cache_memory,
    kv_pool_report,
    memory_args,
    server_command,
)
from kvroute.vllm.weights import CALIBRATION_TENSOR, CalibrationFold, fold_query, fold_value, plan_calibration

__all__ = [
    "CALIBRATION_TENSOR",
    "PLAN_KEY",
    "ROUTED_ARCHITECTURES",
    "CalibrationFold",
    "available_memory",
    "check_windows",
    "default_kv_cache_memory",
    "describe_serving",
    "fold_query",
    "fold_value",
    "hf_overrides",
    "kv_pool_report",
    "memory_args",
    "plan_calibration",
    "register",
    "resolve_plan",
    "routed_architecture",
    "server_command",
]
