"""kvroute: depth-wise KV-cache sharing with stochastic KV routing (R-CLA).

Three calls::

    model = kvroute.load("HuggingFaceTB/SmolLM2-135M")      # any supported HF model
    kvroute.apply(model, policy="rcla", plan="every:2")    # routed: train with R-CLA, serve every:2
    model.generate(ids, max_new_tokens=32)                 # caches only every 2nd layer
    kvroute.calibrate(model, "every:2", ["text/"], tokenizer=tok)  # per-plan maps, no training
    kvroute.fit_pair_maps(model, ["text/"], tokenizer=tok)         # pairwise maps: every plan at once
"""

from kvroute.calibrate import CalibrationConfig, calibrate, is_calibrated, remove_calibration
from kvroute.hf.cache import SharedKVCache
from kvroute.models import convert, load, load_model, load_tokenizer, save_checkpoint
from kvroute.hf.patch import (
    SUPPORTED_FAMILIES,
    PlanMismatchWarning,
    apply,
    get_router,
    is_routed,
    routing_config,
    set_kv_quant,
    set_plan,
)
from kvroute.pairs import fit_pair_maps
from kvroute.plan import KVShape, SharingPlan, parse_plan_list
from kvroute.policy import (
    CLA,
    RCLA,
    RDCLA,
    FixedPlan,
    NoRouting,
    RoutingPolicy,
    policy_from_dict,
    policy_from_spec,
)

__version__ = "0.1.0"

__all__ = [
    "CLA",
    "RCLA",
    "RDCLA",
    "SUPPORTED_FAMILIES",
    "CalibrationConfig",
    "FixedPlan",
    "PlanMismatchWarning",
    "calibrate",
    "fit_pair_maps",
    "is_calibrated",
    "remove_calibration",
    "KVShape",
    "NoRouting",
    "RoutingPolicy",
    "SharedKVCache",
    "SharingPlan",
    "apply",
    "convert",
    "load",
    "load_model",
    "load_tokenizer",
    "save_checkpoint",
    "get_router",
    "is_routed",
    "parse_plan_list",
    "policy_from_dict",
    "policy_from_spec",
    "routing_config",
    "set_kv_quant",
    "set_plan",
]
