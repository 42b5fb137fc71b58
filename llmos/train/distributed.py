"""One process or many: the few torch.distributed calls the training loop makes.

Under `torchrun` (RANK/WORLD_SIZE/LOCAL_RANK in the environment) `init()` joins the process group,
gloo on CPU and NCCL on GPUs, one GPU per local rank; otherwise it is a world of one and every
collective below is a no-op. Rank 0 ("main") prepares data, writes checkpoints and logs; the others
wait at barriers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init(device: str = "auto") -> World:
    """Join the torchrun process group if there is one; always returns this process's World."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return World(rank, size, local, dev)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (and returned)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_ok(ok: bool) -> bool:
    """True when every rank says ok: a failure on one rank (bad data found by rank 0) stops all,
    instead of leaving the others waiting at a barrier."""
    if not active():
        return ok
    t = torch.tensor([0 if ok else 1], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item()) == 0


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of a same-shaped tensor, by rank."""
    if not active():
        return [t]
    device = t.device
    if dist.get_backend() == "nccl":  # NCCL moves GPU tensors only (RNG states live on the CPU)
        t = t.cuda()
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.to(device) for o in out]


def shutdown() -> None:
    if active():
        dist.destroy_process_group()
