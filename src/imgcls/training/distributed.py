"""Several processes (`torchrun --nproc_per_node=N pipeline/train.py`): DDP set-up and reductions.

torchrun sets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`; without them
everything here is a no-op for one process. NCCL joins CUDA processes, gloo CPU ones.
"""

from __future__ import annotations

import datetime
import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

from imgcls.errors import ImgclsError


class DistributedError(ImgclsError):
    """Inconsistent torchrun environment or a process group that cannot start."""


@dataclass(frozen=True)
class Dist:
    """Where this process sits in the job: rank, number of processes, GPU index on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only rank 0 logs, writes files and talks to MLflow."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    """An integer environment variable, with an error naming it if it is not one."""
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None


def from_env() -> Dist:
    """Read the torchrun variables (one process when they are absent)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} does not fit WORLD_SIZE={world}")
    return Dist(rank, world, local)


def setup(dist: Dist, device: torch.device, timeout_s: float = 1800.0) -> torch.device:
    """Join the process group; return this process's device (`cuda:LOCAL_RANK` on GPUs)."""
    if not dist.enabled:
        return device
    if device.type == "cuda":
        if dist.local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK {dist.local_rank} but only {torch.cuda.device_count()} GPUs are "
                "visible; use --nproc_per_node <= the number of GPUs"
            )
        torch.cuda.set_device(dist.local_rank)
        device = torch.device("cuda", dist.local_rank)
    elif device.type != "cpu":
        raise DistributedError(f"several processes need CUDA or CPU, not {device.type}")
    if not tdist.is_initialized():
        tdist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return device


def teardown() -> None:
    """Leave the process group (a no-op for one process)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op for one process)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


@contextmanager
def main_first(dist: Dist) -> Iterator[None]:
    """Each node's local rank 0 runs the block first (fills its decode cache); the rest reuse it.

    Per node, not rank 0 alone: every node has its own disk, so the nodes decode side by side
    instead of one after the other.
    """
    first = dist.local_rank == 0
    if dist.enabled and not first:
        barrier()
    yield
    if dist.enabled and first:
        barrier()


def _comm_device() -> torch.device:
    """NCCL reduces CUDA tensors, gloo CPU ones."""
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (returns `values` itself for one process)."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return values
    buf = values.detach().to(_comm_device(), torch.float64).clone()
    tdist.all_reduce(buf)
    return buf.to(values.device)


def _gather_parts(array: np.ndarray) -> list[np.ndarray]:
    """Every rank's array, in rank order (the first dimension may differ between ranks)."""
    dev = _comm_device()
    world = tdist.get_world_size()
    n = torch.tensor([len(array)], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    tdist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    tensor = torch.from_numpy(np.array(array))  # a writable copy
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype)
    padded[: len(tensor)] = tensor
    parts = [torch.empty_like(padded, device=dev) for _ in range(world)]
    tdist.all_gather(parts, padded.to(dev))
    return [p[: int(s.item())].cpu().numpy() for p, s in zip(parts, sizes, strict=True)]


def gather_rows(array: np.ndarray) -> np.ndarray:
    """Concatenate every rank's rows (ranks may hold different numbers of rows)."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return array
    return np.concatenate(_gather_parts(array))


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (tensors, numbers, strings, containers), in rank order.

    Serialised with torch.save and read back with weights_only=True, like checkpoints.
    """
    if not (tdist.is_available() and tdist.is_initialized()):
        return [obj]
    buf = io.BytesIO()
    torch.save(obj, buf)
    parts = _gather_parts(np.frombuffer(buf.getvalue(), np.uint8))
    return [torch.load(io.BytesIO(p.tobytes()), weights_only=True) for p in parts]
