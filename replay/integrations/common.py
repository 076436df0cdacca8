"""What the trainer callbacks share: the process that records, and the models they refuse."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from replay.errors import RecorderError

SUPPORTED = ("one process, DDP (torchrun / accelerate launch) or DeepSpeed ZeRO stage 1-2, "
             "where every process holds every parameter whole")


def launch_rank() -> int:
    """Global rank of this process as the launcher set it (torchrun, accelerate, SLURM …), 0
    when not launched as one of several; read before any process group exists."""
    for key in ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        value = os.environ.get(key)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


def positive(key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RecorderError(f"{key} must be a positive integer, got {value!r}")
    return value


def json_args(task_args: Any, what: str = "task_args") -> dict:
    try:
        return json.loads(json.dumps(dict(task_args or {})))
    except (TypeError, ValueError) as err:
        raise RecorderError(f"{what} must be a JSON-serialisable mapping: {err}") from None


def sharding(module: torch.nn.Module) -> str | None:
    """What shards ``module``'s parameters across processes (FSDP, DeepSpeed ZeRO-3, DTensor),
    naming the first sharded parameter, or None when every parameter is whole here."""
    wrapper = _fsdp_wrapper(module)
    if wrapper is not None:
        return wrapper
    for name, p in module.named_parameters():
        kind = type(p).__name__
        if hasattr(p, "ds_id") or hasattr(p, "ds_status"):
            return f"DeepSpeed ZeRO-3 (parameter {name!r} is partitioned)"
        if kind == "DTensor" or isinstance(getattr(p, "data", None), _dtensor_type()):
            return f"FSDP2 / DTensor (parameter {name!r} is a DTensor)"
        if kind == "FlatParameter" or getattr(p, "_is_flat_param", False):
            return f"FSDP (parameter {name!r} is a flat parameter)"
    return None


def refuse_sharded(module: torch.nn.Module, what: str | None = None) -> None:
    """RecorderError (one line) if ``module``'s parameters are sharded; ``what`` names a
    sharding found another way (the trainer's settings)."""
    found = what or sharding(module)
    if found:
        raise RecorderError(f"LCACallback cannot record a model sharded by {found}: a trajectory "
                            f"needs every parameter whole in the recording process; supported: "
                            f"{SUPPORTED}")


def _fsdp_wrapper(module) -> str | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a torch built without distributed
        return None
    for m in module.modules():
        if isinstance(m, FullyShardedDataParallel):
            return "FSDP (FullyShardedDataParallel)"
    return None


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return ()
    return DTensor
