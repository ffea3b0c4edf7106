"""Process groups: a single process by default, DDP when launched by torchrun.

Every collective byolkit uses goes through the functions here. They first put the tensor on the
process's own device (`Dist.device`), because NCCL only reduces CUDA tensors of the current
device and refuses a CPU tensor at run time, on the first multi-GPU run; gloo, which the CPU tests
use, would not notice. So a caller may hand in a tensor from anywhere and gets the result back on
`Dist.device`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "mean": dist.ReduceOp.SUM}


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    enabled: bool = False  # in a process group (torchrun), even one of a single process

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_device(device_type: str, local_rank: int = 0) -> torch.device:
    """The one device of this process: its local GPU under torchrun, else the CPU."""
    return torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")


def init_distributed(device_type: str) -> Dist:
    """Join the torchrun process group if there is one (NCCL on GPUs, gloo on CPUs).

    Under torchrun the group is joined even with one process, so that `--nproc_per_node 1`
    runs the same code (DDP, SyncBatchNorm, the collectives) as eight processes do."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return Dist(device=process_device(device_type))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, process_device(device_type, local_rank), enabled=True)


def all_reduce(t: torch.Tensor, d: Dist, op: str = "sum") -> torch.Tensor:
    """`t` reduced over the processes (sum, max, min or mean), as a new tensor on `d.device`.

    The input is never modified; without a process group the result is just `t` on `d.device`."""
    out = t.detach().to(d.device, non_blocking=True).clone()
    if d.enabled:
        dist.all_reduce(out, op=_OPS[op])
        if op == "mean":
            out = out / d.world
    return out


def all_reduce_mean(t: torch.Tensor, d: Dist) -> torch.Tensor:
    return all_reduce(t, d, "mean")


def all_gather_objects(obj, d: Dist) -> list:
    """[each process's `obj`] in rank order (picklable objects; [obj] without a process group)."""
    if not d.enabled:
        return [obj]
    gathered = [None] * d.world
    dist.all_gather_object(gathered, obj)  # NCCL: through the device that init_distributed set current
    return gathered


def barrier(d: Dist) -> None:
    if d.enabled:
        if d.device.type == "cuda":
            dist.barrier(device_ids=[d.device.index])
        else:
            dist.barrier()


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
