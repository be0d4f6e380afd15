"""Distribution on torch's own engine: torchrun sets the environment, DDP or FSDP2 wraps."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> Dist:
    """Joins the process group when launched by torchrun (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    target = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=target)


def all_reduce_sum(value: torch.Tensor, env: Dist) -> torch.Tensor:
    if env.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def wrap_model(model: nn.Module, env: Dist, *, shard: bool) -> nn.Module:
    """DDP over the trainable parameters; or, with ``shard`` (the LM itself trains), FSDP2:
    ``fully_shard`` on each LM layer, then on the whole model."""
    if not env.enabled:
        return model
    if shard:
        for layer in model.decoder.layers():
            fully_shard(layer)
        fully_shard(model)
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def cleanup(env: Dist, *, finished: bool = True) -> None:
    """Leaves the process group, so that every rank of a finished run exits 0.

    A wrapped model holds the group (FSDP2's device mesh, DDP's reducer) inside reference
    cycles, which only the garbage collector frees: left to interpreter shutdown, the group is
    destroyed in a half torn-down process, which aborts it ("terminate called without an active
    exception"). So the model is collected first. After a finished run the ranks also wait for
    each other (rank 0 exports the model last), so none leaves while another still needs it.
    """
    if not (env.enabled and dist.is_initialized()):
        return
    gc.collect()
    if finished:
        dist.barrier()
    dist.destroy_process_group()
