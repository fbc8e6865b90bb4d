"""Apply routing to a loaded transformers model, change its plan, persist its routing setup."""

from __future__ import annotations

import functools
import warnings
from typing import Any

from torch import nn
from transformers.cache_utils import DynamicCache

from kvroute.hf.attention import RoutedAttention
from kvroute.hf.cache import SharedKVCache, shared_layers
from kvroute.hf.compat import CACHE_ARG, DummyLayer
from kvroute.plan import KVShape, SharingPlan, layer_types_of
from kvroute.policy import RoutingPolicy, policy_from_dict, policy_from_spec
from kvroute.router import CONFIG_KEY, Router

#: model_type -> the attention class kvroute replaces.
SUPPORTED_FAMILIES: dict[str, str] = {
    "llama": "LlamaAttention",
    "mistral": "MistralAttention",
    "qwen2": "Qwen2Attention",
    "qwen3": "Qwen3Attention",
    "gemma3_text": "Gemma3Attention",
}
CONFIG_VERSION = 1
#: the decoder's attribute that holds its router (the hooks find it there, so a copy finds its own)
ROUTER_ATTR = "kvroute_router"
#: the forward keyword that names the route of one pass explicitly (a tuple of ints, passed by value,
#: so it reaches the decoder through any wrapper): ``model(ids, kvroute_route=(0, 0, 2, 2))``
ROUTE_ARG = "kvroute_route"
#: a cache's attribute naming the plan the hooks laid it out for
LAYOUT_ATTR = "_kvroute_plan"


class PlanMismatchWarning(UserWarning):
    """A model trained for one plan only (``plan:SPEC`` routing) is set to run another plan."""


def check_supported(config: Any) -> None:
    """Raise a clear error for a model family kvroute does not route."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"kvroute does not support model_type {model_type!r}; supported families: "
            + ", ".join(SUPPORTED_FAMILIES)
        )


def _decoder(model: nn.Module) -> nn.Module:
    """The module that owns the decoder layers (LlamaModel for LlamaForCausalLM), also inside
    wrappers such as a PEFT model."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(layers[0], "self_attn"):
            return module
    raise ValueError(f"kvroute cannot find the decoder layers of {type(model).__name__}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported model (``model.model.layers`` for LlamaForCausalLM)."""
    return _decoder(model).layers


def _routed_layers(model: nn.Module) -> list[RoutedAttention]:
    return [m for m in model.modules() if isinstance(m, RoutedAttention)]


def is_routed(model: nn.Module) -> bool:
    return bool(_routed_layers(model))


def get_router(model: nn.Module) -> Router:
    """The router of a model that :func:`apply` has routed."""
    layers = _routed_layers(model)
    if not layers:
        raise ValueError("this model is not routed; call kvroute.apply(model, ...) first")
    return layers[0].router


def apply(
    model: nn.Module,
    policy: RoutingPolicy | str | None = None,
    plan: SharingPlan | str | None = None,
    seed: int = 0,
) -> nn.Module:
    """Route a transformers model: any layer may read an earlier layer's KV.

    In ``model.train()`` mode every forward pass draws a route from ``policy``; in
    ``model.eval()`` mode the route is ``plan``. Layers that read another layer's KV
    skip their own K/V projections. Calling it again on a routed model changes the
    policy and plan in place.

    Args:
        model: a loaded model of a supported family (Llama, Mistral, Qwen2, Qwen3, Gemma3 text).
        policy: training policy (``"rcla"``, ``"cla:2"``, a :class:`RoutingPolicy`...);
            default: the one saved in the model's config, else ``none``.
        plan: inference plan spec or :class:`SharingPlan`; default: the saved one (when ``policy``
            is the saved one or serves any plan), else the policy's own plan (``plan:SPEC``), else ``full``.
        seed: seed of the generator that draws training routes.

    Returns:
        The same model, routed.

    Warns:
        PlanMismatchWarning: when ``policy`` trains for one plan only (``plan:SPEC``) and ``plan`` is another.

    Example:
        >>> model = kvroute.apply(model, policy="rcla", plan="every:2")  # doctest: +SKIP
    """
    check_supported(model.config)
    saved = getattr(model.config, CONFIG_KEY, None) or {}
    if policy is None:
        policy = policy_from_dict(saved["policy"]) if "policy" in saved else "none"
    policy = policy_from_spec(policy)
    shape = KVShape.from_config(model.config)
    served = policy.served_plans(shape.num_layers, shape.layer_types)  # also: does the policy fit the model
    if plan is None:
        restoring = "plan" in saved and (not served or saved.get("policy") == policy.to_dict())
        plan = saved["plan"] if restoring else served[0] if served else "full"
    plan = SharingPlan.for_model(plan, model.config)
    _check_served(policy, served, plan)

    if is_routed(model):
        router = get_router(model)
        router.policy, router.plan = policy, plan
        router.generator.manual_seed(seed)
    else:
        router = Router(plan, policy, layer_types_of(model.config), seed)
        decoder = _decoder(model)
        expected = SUPPORTED_FAMILIES[model.config.model_type]
        for layer in decoder.layers:
            attn = layer.self_attn
            if type(attn).__name__ != expected:
                raise ValueError(
                    f"kvroute expected {expected} in each decoder layer, found {type(attn).__name__}"
                )
            layer.self_attn = RoutedAttention(attn, router)
        setattr(decoder, ROUTER_ATTR, router)
        decoder.register_forward_pre_hook(_enter_pass, with_kwargs=True)
        decoder.register_forward_hook(_exit_pass, with_kwargs=True, always_call=True)
    _write_config(model, router)
    return model


def set_plan(model: nn.Module, plan: SharingPlan | str) -> SharingPlan:
    """Change the inference plan of a routed model without reloading it.

    Also becomes the default plan saved with the model.

    Warns:
        PlanMismatchWarning: when the model was trained for one plan only (``plan:SPEC``
            routing) and ``plan`` is another, ``full`` included.
    """
    router = get_router(model)
    router.plan = SharingPlan.for_model(plan, model.config)
    shape = KVShape.from_config(model.config)
    _check_served(router.policy, router.policy.served_plans(shape.num_layers, shape.layer_types), router.plan)
    _write_config(model, router)
    return router.plan


def set_kv_quant(model: nn.Module, kv_quant: Any) -> Any:
    """Store KV quantized (``"int8"``, ``"int4"``; ``None`` or ``"none"``: full precision) in every cache
    kvroute builds for this routed model from now on: the one a forward or ``generate()`` makes, an
    empty ``DynamicCache`` it lays out, and :meth:`SharedKVCache.for_model`.

    Returns the :class:`~kvroute.kvquant.KVQuant` (or None).
    """
    from kvroute.kvquant import KVQuant

    router = get_router(model)
    router.kv_quant = KVQuant.parse(kv_quant)
    return router.kv_quant


def _check_served(policy: RoutingPolicy, served: tuple[SharingPlan, ...], plan: SharingPlan) -> None:
    """Warn when a model fit for some plans only (``plan:SPEC``) is set to run another."""
    if served and all(p.source != plan.source for p in served):
        names = " and ".join(repr(p.spec) for p in served)
        warnings.warn(
            f"kvroute: this model was fine-tuned for plan {names} only (routing {policy.spec!r}); "
            f"under plan {plan.spec!r} it may be much worse, as under any plan it was not trained for, full "
            f"included. set_plan(model, {served[0].spec!r}) runs a plan it was trained for",
            PlanMismatchWarning,
            stacklevel=3,
        )


def routing_config(model: nn.Module) -> dict[str, Any]:
    """The routing setup saved in a checkpoint's config: policy and default plan."""
    router = get_router(model)
    return {
        "version": CONFIG_VERSION,
        "policy": router.policy.to_dict(),
        "plan": router.plan.spec,
        "source": list(router.plan.source),
    }


def _write_config(model: nn.Module, router: Router) -> None:
    setattr(model.config, CONFIG_KEY, routing_config(model) if is_routed(model) else None)


def _enter_pass(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Decoder pre-hook: route this forward pass on the decoder's own router; lay out the cache.

    The route is the forward's :data:`ROUTE_ARG` if given (taken out of the kwargs here), else
    drawn from the policy (training) or the plan's (eval). Module-level, holding no model
    object: a deep copy or a pickle of the model runs the same hook on its own router.
    """
    router: Router = getattr(module, ROUTER_ATTR)
    routing = router.enter(module.training, kwargs.pop(ROUTE_ARG, None))
    if module.training:
        if router.policy.routes:
            _check_checkpointing(module)
        return args, kwargs
    name = CACHE_ARG if CACHE_ARG in kwargs else "past_key_values" if "past_key_values" in kwargs else "cache"
    cache = kwargs.get(name)
    plan = router.plan
    if routing.route != plan.source and (cache is not None or kwargs.get("use_cache") is not False):
        raise ValueError(
            f"kvroute: an explicit {ROUTE_ARG} other than the plan's source map runs without a cache; "
            "pass use_cache=False, or set_plan() to decode under a plan"
        )
    if cache is None:
        use_cache = kwargs.get("use_cache")
        if use_cache if use_cache is not None else getattr(module.config, "use_cache", False):
            kwargs[name] = SharedKVCache(plan, KVShape.from_config(module.config), kv_quant=router.kv_quant)
        return args, kwargs
    known = cache.plan if isinstance(cache, SharedKVCache) else getattr(cache, LAYOUT_ATTR, None)
    if known is plan:  # the decode fast path: nothing to check
        return args, kwargs
    if type(cache) is DynamicCache and not cache.offloading and cache.get_seq_length() == 0:
        # an empty cache from generate() or the caller: give it the shared layout in place,
        # so the caller's reference still holds the KV on the next call
        recording = any(getattr(layer, "record_past", False) for layer in cache.layers)
        cache.layers[:] = shared_layers(plan, KVShape.from_config(module.config), kv_quant=router.kv_quant)
        if recording:  # assisted and prompt-lookup decoding crop the cache later: keep what they asked for
            for layer in cache.layers:
                if hasattr(layer, "activate_past_recording"):
                    layer.activate_past_recording()
        setattr(cache, LAYOUT_ATTR, plan)
    elif known is not None and known.source != plan.source:
        raise ValueError(
            f"this cache was built for plan {known.spec!r} but the model runs plan "
            f"{plan.spec!r}; build a new cache after set_plan()"
        )
    elif known is None and any(
        o < len(cache.layers) and isinstance(cache.layers[o], DummyLayer) for o in plan.owners
    ):
        raise ValueError(
            f"this cache holds no KV for some owners of plan {plan.spec!r}; "
            "build a new cache after set_plan()"
        )
    return args, kwargs


def _exit_pass(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    """Decoder hook, also run when the forward raises: end the pass :func:`_enter_pass` began."""
    getattr(module, ROUTER_ATTR).exit()


def _check_checkpointing(decoder: nn.Module) -> None:
    """Reentrant checkpointing drops the gradient a layer sends to the layer whose KV it reads."""
    for layer in decoder.layers:
        func = getattr(layer, "_gradient_checkpointing_func", None)
        if (
            getattr(layer, "gradient_checkpointing", False)
            and isinstance(func, functools.partial)
            and func.keywords.get("use_reentrant", True)  # torch's default when unset
        ):
            raise ValueError(
                "kvroute: reentrant gradient checkpointing (use_reentrant=True) loses the gradients that "
                "routed layers send to the layers whose KV they read; use "
                "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})"
            )
