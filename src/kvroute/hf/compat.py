"""What differs between the transformers versions kvroute supports, in one place.

kvroute runs on transformers 5.19 (what vLLM releases pin) up to the newest 5.x; CI tests
5.19 (beside vLLM) and the newest. Two things changed in that range, and both are detected
here, not guessed from version numbers:

- the keyword that forward passes and ``generate()`` take a KV cache under, and the output
  field that returns it: ``past_key_values`` in 5.19-5.20, ``cache`` in 5.24 and later;
- ``DummyLayer``, the cache layer of a layer that reads another layer's KV: 5.24 has it,
  5.19-5.20 do not, and kvroute supplies one with the same interface.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers.models.llama.modeling_llama import LlamaModel

#: the keyword a model's forward and ``generate()`` take the KV cache under
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``model(ids, **cache_kwargs(cache))``: pass a cache under this transformers' name."""
    return {CACHE_ARG: cache}


def output_cache(output: Any) -> Any:
    """The cache a model output returns (``output.cache`` or ``output.past_key_values``)."""
    return getattr(output, CACHE_ARG)


try:
    from transformers.cache_utils import DummyLayer
except ImportError:  # transformers 5.19-5.20
    from transformers.cache_utils import CacheLayerMixin

    class DummyLayer(CacheLayerMixin):  # the interface of transformers' own, plus ``owner``
        """A cache layer that stores nothing: a layer that reads another layer's KV.

        In 5.19-5.20, transformers' masks ask the cache about any layer (the first one that
        is not sliding, say), so this layer answers for its ``owner``, the layer whose KV
        it reads (set by :func:`kvroute.hf.cache.shared_layers`).
        """

        is_compileable = True
        is_croppable = True
        supports_early_init = False

        def __init__(self, **kwargs: Any) -> None:
            super().__init__()
            self.is_initialized = True
            self.owner: Any = None

        @property
        def is_sliding(self) -> bool:
            return bool(getattr(self.owner, "is_sliding", False))

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None: ...

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any):
            if key_states is None and value_states is None:
                return None, None
            raise NotImplementedError("a shared-cache layer stores no KV: it cannot be updated")

        def get_seq_length(self) -> int:
            return self.owner.get_seq_length() if self.owner is not None else 0

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            if self.owner is not None:
                return self.owner.get_mask_sizes(query_length)
            return query_length, 0

        def get_max_length(self) -> int:
            return self.owner.get_max_length() if self.owner is not None else -1

        def offload(self) -> None: ...
        def prefetch(self) -> None: ...
        def reset(self) -> None: ...
        def crop(self, tokens_to_remove: int) -> None: ...
        def reorder_cache(self, beam_idx: torch.LongTensor) -> None: ...
        def batch_repeat_interleave(self, repeats: int) -> None: ...
        def batch_select_indices(self, indices: torch.Tensor) -> None: ...
