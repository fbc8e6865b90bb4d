"""Generation through the shared cache, with the KV memory it saved."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from kvroute.calibrate import is_calibrated
from kvroute.hf.cache import SharedKVCache
from kvroute.hf.compat import cache_kwargs
from kvroute.hf.patch import get_router, set_plan
from kvroute.metrics import distinct_n
from kvroute.plan import KVShape, SharingPlan


@dataclass(frozen=True)
class GenerationResult:
    """What one generation produced and what its cache cost.

    Attributes:
        text: the generated continuation.
        new_tokens: tokens generated.
        seconds: wall time of the whole generate call (prefill included).
        kv_bytes: bytes the shared cache held at the end.
        kv_bytes_full: bytes the ``full`` plan would have held for the same tokens.
        plan: the plan generation ran under.
        calibrated: whether the plan ran with a calibration (:mod:`kvroute.calibrate`).
        distinct2: distinct bigrams / all bigrams of the generated tokens (low: a degenerate loop).
    """

    text: str
    new_tokens: int
    seconds: float
    kv_bytes: int
    kv_bytes_full: int
    plan: SharingPlan
    calibrated: bool = False
    distinct2: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        saved = 1 - self.kv_bytes / self.kv_bytes_full if self.kv_bytes_full else 0.0
        return (
            f"{self.new_tokens} tokens in {self.seconds:.2f} s ({self.tokens_per_second:.1f} tok/s); "
            f"KV cache {self.kv_bytes / 1024:.1f} KiB vs {self.kv_bytes_full / 1024:.1f} KiB under full "
            f"({100 * saved:.0f}% saved); distinct-2 {self.distinct2:.2f}; {self.plan.describe()}"
            f"{', calibrated' if self.calibrated else ''}"
        )


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    plan: SharingPlan | str | None = None,
    max_new_tokens: int = 64,
    chat: bool = False,
    temperature: float = 0.0,
    seed: int = 0,
    on_text: Callable[[str], None] | None = None,
    kv_quant: Any = None,
) -> GenerationResult:
    """Generate a continuation of ``prompt`` with a cache that stores only the plan's owners.

    Args:
        model: a routed model (``kvroute.load`` or ``kvroute.apply``).
        tokenizer: its tokenizer.
        prompt: the prompt text (a user message when ``chat``).
        plan: plan to generate under; default: the model's active plan.
        kv_quant: store the owners' KV as ``int8`` or ``int4``; default: the model's (:func:`kvroute.set_kv_quant`).
        max_new_tokens: generation length limit.
        chat: wrap the prompt with the tokenizer's chat template.
        temperature: 0 for greedy, else sampling temperature.
        seed: sampling seed.
        on_text: called with each new piece of text as it is generated (streaming).

    Returns:
        The text, its distinct-2, the cache's measured size against ``full`` and
        whether the plan ran calibrated.
    """
    from transformers.generation.streamers import BaseStreamer

    if plan is not None:
        set_plan(model, plan)
    model.eval()
    active = get_router(model).plan
    device = next(model.parameters()).device
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat needs a tokenizer with a chat template; this one has none")
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    prompt_len = inputs["input_ids"].shape[1]
    shape = KVShape.from_config(model.config)
    quant = get_router(model).kv_quant if kv_quant is None else kv_quant
    cache = SharedKVCache(active, shape, max_cache_len=prompt_len + max_new_tokens, kv_quant=quant)

    class _Stream(BaseStreamer):
        def __init__(self) -> None:
            self.ids: list[int] = []
            self.printed = 0
            self.first = True

        def put(self, value: torch.Tensor) -> None:
            if self.first:  # the prompt
                self.first = False
                return
            self.ids.extend(value.reshape(-1).tolist())
            text = tokenizer.decode(self.ids, skip_special_tokens=True)
            if on_text is not None and len(text) > self.printed and not text.endswith("\ufffd"):
                on_text(text[self.printed :])
                self.printed = len(text)

        def end(self) -> None:
            text = tokenizer.decode(self.ids, skip_special_tokens=True)
            if on_text is not None and len(text) > self.printed:
                on_text(text[self.printed :])

    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **inputs, **cache_kwargs(cache), max_new_tokens=max_new_tokens, streamer=_Stream(),
            pad_token_id=tokenizer.pad_token_id, **sampling,
        )
    seconds = time.perf_counter() - start
    new = out[0, prompt_len:]
    held_tokens = cache.get_seq_length()
    dtype = next(model.parameters()).dtype
    full = SharingPlan.for_model("full", model.config).kv_bytes(shape, held_tokens, 1, dtype)
    return GenerationResult(
        text=tokenizer.decode(new, skip_special_tokens=True),
        new_tokens=int(new.numel()),
        seconds=seconds,
        kv_bytes=cache.used_bytes(),
        kv_bytes_full=full,
        plan=active,
        calibrated=is_calibrated(model, active),
        distinct2=distinct_n(new.tolist(), 2),
    )
