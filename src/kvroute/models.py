"""Load models from a hub id, a local folder or a GGUF file; convert GGUF to safetensors.

A kvroute checkpoint is a plain transformers checkpoint whose config carries a
``kvroute`` entry (training policy and default plan); :func:`load` restores it.
"""

from __future__ import annotations

import json
import contextlib
import os
import struct
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from kvroute.dtypes import resolve_dtype  # noqa: F401  (re-exported: models.resolve_dtype)
from kvroute.hf.patch import CONFIG_KEY, apply, check_supported, is_routed
from kvroute.plan import SharingPlan
from kvroute.policy import RoutingPolicy


def _split_gguf(source: str | os.PathLike) -> tuple[str, str | None]:
    text = str(source)
    if text.endswith(".gguf"):
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        with path.open("rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ValueError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
        return str(path.parent), path.name
    return text, None


@contextlib.contextmanager
def _reading_gguf(source: str | os.PathLike, gguf: str | None):
    """A GGUF file that transformers cannot parse (truncated, corrupt) gets an error that names it."""
    try:
        yield
    except (struct.error, EOFError, IndexError, KeyError, UnicodeDecodeError) as err:
        if gguf is None:
            raise
        raise ValueError(f"{source}: cannot read this GGUF file, it may be truncated or corrupt "
                         f"({type(err).__name__}: {err})") from None


def check_source(source: str | os.PathLike) -> None:
    """Raise FileNotFoundError for a local path that does not exist (hub ids pass)."""
    text = str(source)
    looks_local = text.startswith((".", "/", "~")) or os.sep in text and not _is_hub_id(text)
    if looks_local and not Path(text).expanduser().exists():
        raise FileNotFoundError(f"checkpoint not found: {text}")


def _is_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not Path(text).exists()


def load_tokenizer(source: str | os.PathLike):
    """The tokenizer of a hub id, folder or GGUF file."""
    from transformers import AutoTokenizer

    check_source(source)
    folder, gguf = _split_gguf(source)
    with _reading_gguf(source, gguf):
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_config(source: str | os.PathLike) -> Any:
    """The transformers config of a hub id, folder or GGUF file, checked for a supported family.

    Cheap (no weights), so callers can validate a run before any work.
    """
    from transformers import AutoConfig

    check_source(source)
    folder, gguf = _split_gguf(source)
    with _reading_gguf(source, gguf):
        config = AutoConfig.from_pretrained(folder, **({"gguf_file": gguf} if gguf else {}))
    check_supported(config.get_text_config(decoder=True))
    return config


def load_model(
    source: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> torch.nn.Module:
    """Load a causal LM (hub id, folder or GGUF file, dequantized) without routing it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_source(source)
    folder, gguf = _split_gguf(source)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype), "attn_implementation": attn_implementation}
    if gguf:
        kwargs["gguf_file"] = gguf
    with _reading_gguf(source, gguf):
        config = AutoConfig.from_pretrained(folder, **({"gguf_file": gguf} if gguf else {}))
        check_supported(config.get_text_config(decoder=True))
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if gguf:  # a dequantized GGUF model refuses save_pretrained: rebuild it as a plain model
        model = _dequantized_copy(model, resolve_dtype(dtype))
    return model.to(device).eval()


def _dequantized_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=config._attn_implementation)
    plain.load_state_dict(model.state_dict(), strict=True)
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = model.generation_config
    return plain


def load(
    source: str | os.PathLike,
    plan: SharingPlan | str | None = None,
    policy: RoutingPolicy | str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> torch.nn.Module:
    """Load a model and route it, restoring the routing saved in its config.

    Args:
        source: hub id, local folder (plain HF or kvroute checkpoint) or ``.gguf`` file.
        plan: inference plan; default: the checkpoint's saved plan, else ``full``.
        policy: training policy; default: the saved one, else ``none``.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        device: where to put the model.

    Returns:
        The routed model in eval mode.

    Example:
        >>> model = kvroute.load("runs/rcla/final", plan="every:4")  # doctest: +SKIP
    """
    from kvroute.calibration.store import load_calibration
    from kvroute.pairs import load_pair_maps

    model = load_model(source, dtype=dtype, device=device, attn_implementation=attn_implementation)
    model = apply(model, policy=policy, plan=plan, seed=seed).eval()
    folder, _ = _split_gguf(source)
    if Path(folder).is_dir():
        load_calibration(model, folder)
        load_pair_maps(model, folder)
    return model


def save_checkpoint(
    model: torch.nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write model (safetensors + config with the routing setup), its calibrations and tokenizer atomically.

    ``state_dict`` replaces the model's own weights (a sharded model's gathered weights).
    Pairwise maps (:mod:`kvroute.pairs`) go to a file of their own, not into the weights.

    The checkpoint is written to a temporary folder beside ``out_dir`` and renamed
    into place, so a half-written checkpoint never looks complete.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        routed = is_routed(model)
        if routed:
            from kvroute.pairs import PAIRS_PREFIX, has_pair_maps

            pair_state = state_dict  # under FSDP the maps are sharded: the gathered ones are saved
            if has_pair_maps(model):  # they are parameters, but not the model's weights
                state_dict = {k: v for k, v in (state_dict or model.state_dict()).items() if PAIRS_PREFIX not in k}
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if routed:
            from kvroute.calibration.store import save_calibration
            from kvroute.pairs import save_pair_maps

            save_calibration(model, tmp)
            save_pair_maps(model, tmp, pair_state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def convert(source: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """Write any loadable model (a GGUF file included) as a plain safetensors checkpoint.

    Returns:
        The output folder.
    """
    model = load_model(source, dtype=dtype)
    tokenizer = load_tokenizer(source)
    return save_checkpoint(model, out_dir, tokenizer)


def saved_routing(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The routing setup in a checkpoint folder's config.json, if any."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get(CONFIG_KEY)
