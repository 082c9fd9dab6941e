"""torch.distributed in one place: rank and world size, set-up under torchrun, barriers.
Synthesis, student training and the command line all use these (no import between them)."""
from __future__ import annotations

import os

import torch


def info() -> tuple[int, int]:
    """(rank, world_size) when torch.distributed is initialised, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank() -> int:
    return info()[0]


def init_from_env() -> bool:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1): gloo on the
    CPU, nccl on CUDA (each process on its LOCAL_RANK device). True when it initialised."""
    import torch.distributed as dist

    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return True
    return False


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def device(name: str | None = None) -> torch.device:
    """The device to run on: ``name`` when given, else cuda (this process's LOCAL_RANK under
    torchrun) when available, else cpu."""
    if name:
        dev = torch.device(name)
    else:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return dev
