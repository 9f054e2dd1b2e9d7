"""Multi-process training under `torchrun`: process group, gathers, gradient averaging.

One process per device. `torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything
here is the identity and training runs in one process. Backend: NCCL on GPUs, gloo on CPU.

Gradients: the trainer wraps the method's forward + loss of a micro-batch (`MethodStep`: every
use of the model in a step, including a method's second pass through the fusion or a head) in
DistributedDataParallel (`wrap_ddp`), which averages the gradients in buckets while the
backward pass still runs. With gradient accumulation the non-final micro-batches run under
`no_sync`, so the averaging happens once per step, during the last backward. Methods edit
gradients only after backward (`modulate_gradients`), and DDP's averaging is linear, so they
see exactly the averaged gradients the earlier hand-written flat all-reduce gave them (average,
then modify; `tests/training/test_distributed.py` checks 2 processes against 1). Per-loss
gradients a method takes with `autograd.grad` bypass DDP and are averaged by the method itself
(`ctx.gather`). `benchmarks/bench_ddp.py` measured DDP against the flat all-reduce (no
difference beyond noise on the CPU: docs/benchmarks.md), so only DDP is kept.

Train batches have the same size on every rank: the DistributedSampler gives each rank the same
number of samples, so `gather` can use an equal-size all_gather.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from multifair.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank among world_size processes, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0 is the only writer of logs, checkpoints, predictions and metrics."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` -> this process's GPU when there is one, else the CPU; `cuda` -> cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"train.device: {name!r} requested but no CUDA device is available")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"train.device: not a torch device (got {name!r})") from None


def setup(device: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Join the torchrun process group if launched by torchrun, else a one-process `DistEnv`."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def make_gather(env: DistEnv):
    """`ctx.gather`: concatenate a detached per-rank tensor from all ranks along dim 0."""
    if not env.distributed:
        return _identity

    def gather(t: Tensor) -> Tensor:
        t = t.detach().contiguous()
        out = torch.empty(
            (env.world_size * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device
        )
        dist.all_gather_into_tensor(out, t)
        return out

    return gather


def make_mean(env: DistEnv):
    """The mean over ranks of a detached tensor (one all_reduce); the identity in one process."""
    if not env.distributed:
        return _identity

    def mean(t: Tensor) -> Tensor:
        out = t.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.div_(env.world_size)

    return mean


def _identity(t: Tensor) -> Tensor:
    return t


def wrap_ddp(
    step: nn.Module, env: DistEnv, *, find_unused_parameters: bool = False
) -> nn.parallel.DistributedDataParallel | None:
    """`step` (the trainer's forward + loss module) in DistributedDataParallel, or None in one
    process without a process group (a benchmark may form a group of one to measure DDP).

    Buffers are not broadcast every forward (`forward_sync_buffers=False`, one collective per
    step saved): method state is identical on every rank by construction, and BatchNorm
    statistics are synchronised before each evaluation (`broadcast_state`). Inputs are not moved (`device_ids`
    unset): batches are already on the device, and the step context is not a tensor."""
    if not (env.distributed or dist.is_initialized()):
        return None
    return nn.parallel.DistributedDataParallel(
        step, forward_sync_buffers=False, find_unused_parameters=find_unused_parameters
    )


def broadcast_state(module: nn.Module, env: DistEnv) -> None:
    """Copy rank 0's parameters and floating buffers to every rank (start of training, and
    before each evaluation so that BatchNorm statistics agree, as DDP's broadcast_buffers does)."""
    if not env.distributed:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def all_gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Gather one picklable object per rank (evaluation outputs; not on the training hot path)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's `obj` on every rank (e.g. a stop decision, so all ranks leave the loop together)."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank when `flag` is True on some rank (one all_reduce of one number and a
    host sync: call it where the loop syncs anyway); `flag` itself in one process."""
    if not env.distributed:
        return flag
    t = torch.tensor([int(flag)], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def state_digest(module: nn.Module) -> str:
    """sha256 over the module's state (names, dtypes, shapes, bytes): equal digests on every
    rank show that the replicas stayed identical."""
    from multifair.training.checkpoint import tensors_digest

    return tensors_digest(module.state_dict().items())
