"""FSDP2 for training: shard a routed model, clip, and save or load sharded training state.

kvroute shards with torch's own FSDP2 (``torch.distributed.fsdp.fully_shard``): one unit
per decoder layer plus the root (embeddings, final norm, head). Routing needs nothing
from the sharding: each pass's route and KV live on the model's :class:`~kvroute.router.Router`,
so FSDP2's argument rebuilding cannot split them between layers, and every rank draws
the same route from the same seeded generator.

Checkpoints use torch distributed checkpoint (DCP): every rank writes its own shards of
the weights and the optimizer state, and a run resumes from them on the same number of
processes. The final model is gathered into one ordinary transformers folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

#: the sub-folder of a training-state folder that holds the sharded weights and optimizer
DCP_DIR = "dcp"


def require_process_group() -> int:
    """The world size of the running process group; a clear error when there is none."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "--fsdp shards the model over processes: launch with `torchrun --nproc_per_node N -m kvroute "
            "train ...` or `accelerate launch -m kvroute train ...` (one process per device)"
        )
    return dist.get_world_size()


def shard(model: nn.Module, device: torch.device) -> nn.Module:
    """Apply FSDP2 in place: each decoder layer is a unit, the root holds the rest.

    Returns the same model; its parameters become DTensors sharded over all processes.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from kvroute.hf.patch import decoder_layers

    mesh = init_device_mesh(device.type, (require_process_group(),))
    model.to(device)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Reduce-scatter gradients after this backward (the last micro-batch) or keep accumulating."""
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm of a sharded model; returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU of rank 0 (empty on the others). Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Write this rank's shards of weights and optimizer state under ``folder/dcp``. Every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(Path(folder) / DCP_DIR))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Load what :func:`save_sharded` wrote into the sharded ``model`` and ``optimizer``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(folder) / DCP_DIR
    if not path.is_dir():
        raise ValueError(f"--resume: {folder.parent} holds no sharded (--fsdp) training state; resume without --fsdp")
    model_state, optim_state = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
