"""Process-group helpers shared by ``kvcomp train-hash`` and ``kvcomp eval``.

Both commands run unchanged as one process or under a launcher that starts N copies of them:

    accelerate launch --multi_gpu --num_processes N -m kvcomp.cli eval ...
    torchrun --nproc_per_node N -m kvcomp.cli train-hash ...

The launcher sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
``init()`` then joins the process group (or uses one the caller already made); the group stays
for the life of the process, so a second command or training run in the same process reuses it
(re-creating a destroyed group against the launcher's store does not work). A group ``init()``
created is destroyed by an ``atexit`` handler, while the interpreter is still whole: left to the
interpreter's teardown, gloo's worker threads are destroyed while joinable and the process can
abort ("terminate called without an active exception", SIGABRT) after its work is done. Work is split
by ``shard()`` (item i goes to rank i % N, a deterministic assignment), results travel to
rank 0 by ``gather()`` (``torch.distributed.gather_object``), and rank 0 alone writes files.

The process group uses the gloo backend: what crosses processes is each rank's finished result
(pickled CPU tensors and dicts), once per stage, where NCCL would only add a copy to the GPU.
``--device cuda`` places rank r on ``cuda:{LOCAL_RANK}`` (``local_device``).
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch

__all__ = ["DistContext", "env_ranks", "finish", "gather", "init", "local_device", "shard"]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world`` processes, ``local_rank`` on its host;
    ``owned``: this ``init()`` call created the process group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def env_ranks() -> tuple[int, int, int]:
    """(rank, world, local_rank) as the launcher set them in the environment ((0, 1, 0) alone)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"inconsistent launcher environment: RANK={rank}, WORLD_SIZE={world}")
    return rank, world, local


def init(backend: str = "gloo") -> DistContext:
    """Join the process group of this run. An existing group (e.g. made by ``Accelerator()``) is
    used as it is; otherwise, when the environment says WORLD_SIZE > 1, one is created with
    ``backend`` from the launcher's environment (``init_method="env://"``). Alone: rank 0 of 1."""
    import torch.distributed as dist

    _, _, local = env_ranks()
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local, owned=False)
    rank, world, local = env_ranks()
    if world == 1:
        return DistContext()
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    dist.init_process_group(backend=backend, init_method="env://")
    atexit.register(_destroy_at_exit)
    return DistContext(dist.get_rank(), dist.get_world_size(), local, owned=True)


def _destroy_at_exit() -> None:
    """Destroy the process group ``init()`` created, unless the caller already has."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: str | torch.device) -> str:
    """The device this process computes on. ``"cuda"`` becomes ``"cuda:{LOCAL_RANK}"`` (and the
    current CUDA device is set to it); any other value (``"cpu"``, ``"cuda:1"``) is kept."""
    device = str(device)
    if device != "cuda":
        return device
    _, _, local = env_ranks()
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available")
    n = torch.cuda.device_count()
    if local >= n:
        raise RuntimeError(f"LOCAL_RANK={local} but only {n} CUDA device(s) are visible")
    torch.cuda.set_device(local)
    return f"cuda:{local}"


def shard(n: int, ctx: DistContext) -> list[int]:
    """The items of ``range(n)`` this rank handles: i with i % world == rank."""
    return list(range(ctx.rank, n, ctx.world))


def gather(obj, ctx: DistContext) -> list | None:
    """Every rank's ``obj``, in rank order, on rank 0 (``None`` on the others). Alone: [obj]."""
    if not ctx.active:
        return [obj]
    import torch.distributed as dist

    out = [None] * ctx.world if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def finish(ctx: DistContext) -> None:
    """Wait for every rank (rank 0 has written its files by now). The group is kept (see the
    module docstring); it goes with the process."""
    if not ctx.active:
        return
    import torch.distributed as dist

    dist.barrier()
