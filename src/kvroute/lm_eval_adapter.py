"""lm-evaluation-harness adapter: the model ``kvroute`` (a routed HF model under a plan).

lm-eval (0.4.x) finds models in its own registry only: it has no plugin entry
point for external models, and its CLI imports nothing of ours. So the model is
registered when this module is imported, and running this module registers it
and hands the command line to lm-eval's own CLI::

    python -m kvroute.lm_eval_adapter --model kvroute \\
        --model_args pretrained=runs/rcla/final,plan=every:2 \\
        --tasks my_task --include_path tasks/ --device cpu

From Python, import this module before calling lm-eval::

    import kvroute.lm_eval_adapter  # registers "kvroute"
    lm_eval.simple_evaluate(model="kvroute", model_args="pretrained=PATH,plan=every:4", tasks=[...])

Model args: ``pretrained`` (hub id, folder or ``.gguf``), ``plan`` (default: the
checkpoint's saved plan), ``dtype`` (float32, bfloat16, float16), ``device``, and
every other ``HFLM`` argument (``batch_size``, ``max_length``...). Generation runs
through :class:`kvroute.SharedKVCache`, as serving does.
"""

from __future__ import annotations

import sys
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from kvroute.hf.patch import get_router
from kvroute.models import load, load_tokenizer


@register_model("kvroute")
class KVRouteLM(HFLM):
    """lm-eval's HF model, loaded with :func:`kvroute.load` and run under a sharing plan.

    Args:
        pretrained: hub id, folder or ``.gguf`` file.
        plan: plan spec (``every:2``...); default: the checkpoint's saved plan, else ``full``.
        dtype: ``float32``, ``bfloat16`` or ``float16`` (``auto`` means float32).
        device: where to run.
        **kwargs: other ``HFLM`` arguments (batch_size, max_length, ...).
    """

    def __init__(
        self,
        pretrained: str,
        plan: str | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> None:
        dtype = "float32" if dtype in (None, "auto") else str(dtype)
        model = load(pretrained, plan=plan, dtype=dtype, device=device)
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer or pretrained)
        kwargs.pop("parallelize", None)
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
        self.plan = get_router(model).plan


def main(argv: list[str] | None = None) -> None:
    """lm-eval's CLI with the ``kvroute`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
