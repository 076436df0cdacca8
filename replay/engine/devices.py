"""Which torch device a replay task computes on.

``"cuda"`` without an index means "this worker's GPU": a batch job that asked for one GPU sees
exactly one (the batch system sets CUDA_VISIBLE_DEVICES), and the workers of a LocalCluster on
a multi-GPU machine spread over the GPUs by worker number.
"""

from __future__ import annotations

import socket

import torch

from replay.errors import ReplayError


def task_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ReplayError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ReplayError(
                f"device {name!r} requested but torch on host {socket.gethostname()} sees no "
                "CUDA GPU (torch.cuda.is_available() is False); use --device cpu, or run the "
                "workers on GPU nodes with a CUDA build of torch"
            )
        if device.index is None:
            device = torch.device("cuda", _worker_number() % torch.cuda.device_count())
    return device


def _worker_number() -> int:
    try:
        from distributed import get_worker

        return int(get_worker().name)
    except (ImportError, ValueError, TypeError):
        return 0  # not on a Dask worker, or one named by its batch job: its only GPU
