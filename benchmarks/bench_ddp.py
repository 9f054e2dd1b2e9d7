"""Gradient averaging under torchrun: DistributedDataParallel vs one flat all-reduce.

    python benchmarks/bench_ddp.py                         # 2 gloo processes on the CPU
    python benchmarks/bench_ddp.py --methods erm,multifair --preset small --batch 16
    python benchmarks/bench_ddp.py --device cuda --world-size 1 --preset paper --batch 32
        # NCCL on one GPU (benchmarks/gpu_check.sh): DDP's own cost, and that it trains alike

Two processes (gloo, one thread each) run the trainer's real step (`train_step`) of the small
preset on a fixed per-rank batch, through each way of averaging the gradients:
- `ddp`: the step wrapped in DistributedDataParallel (what the trainer does): gradients are
  reduced bucket by bucket while the backward pass still runs;
- `ddp+unused`: the same with `find_unused_parameters=True` (a graph walk per step);
- `flat`: the earlier trainer's way: after the backward, every gradient flattened into one buffer
  and summed with one all_reduce (no overlap with the backward).
Paths alternate in rounds so that drifting load hits them alike; the table shows the median
wall time per step (the slower rank's), the ratio to `flat`, and how far each path's parameters
ended from the flat path's after the same steps (each step draws the same dropout masks on
every path; what is left are rounding-level differences that AdamW amplifies where a gradient
is ~0, e.g. attention key biases, and that a method's thresholds can amplify further).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_step import PRESETS, make_batch
from torch import Tensor

import multifair.methods  # noqa: F401  (registers the methods)
from multifair.data.bundle import ModalitySpec
from multifair.methods.base import StepContext, build_method
from multifair.models import build_model
from multifair.training import distributed
from multifair.training.config import TrainConfig
from multifair.training.distributed import DistEnv
from multifair.training.inference import resolve_amp
from multifair.training.trainer import MethodStep, build_optimizer, train_step

PATHS = ("flat", "ddp", "ddp+unused")


def flat_all_reduce(params: list[torch.nn.Parameter], world_size: int) -> None:
    """The pre-DDP averaging: one collective over all gradients, flattened (float32 only here)."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch._utils._flatten_dense_tensors(grads)  # (sum of numels,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(world_size)
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


class Runner:
    """One method's model, optimizer and step through one averaging path."""

    def __init__(
        self,
        name: str,
        path: str,
        preset: dict[str, Any],
        env: DistEnv,
        amp_dtype: torch.dtype | None,
    ) -> None:
        size, slices = preset["image"], preset["slices"]
        specs = {
            "fundus": ModalitySpec("fundus", "image", (3, size, size), 3, (1, size, size), "uint8"),
            "oct": ModalitySpec("oct", "volume", (slices, size, size), slices, (slices, size, size), "uint8"),
        }  # fmt: skip
        torch.manual_seed(0)
        self.model = build_model(preset["model"], specs).to(env.device)
        self.method = build_method(name, {}, list(specs), 3)
        self.method.setup(self.model)
        self.method.to(env.device)
        self.optimizer, self.groups = build_optimizer(
            self.model, self.method, TrainConfig(), env.device
        )
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=False)
        self.amp_dtype = amp_dtype
        self.env = env
        self.ddp = None
        if path.startswith("ddp"):
            step = MethodStep(self.model, self.method)
            self.ddp = distributed.wrap_ddp(step, env, find_unused_parameters=path == "ddp+unused")
        else:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            edit = self.method.modulate_gradients

            def reduce_then_edit(model: Any, loss: Any, ctx: Any) -> dict[str, Tensor]:
                flat_all_reduce(params, env.world_size)  # where the old trainer reduced
                return edit(model, loss, ctx)

            self.method.modulate_gradients = reduce_then_edit  # type: ignore[method-assign]
        self.gather = distributed.make_gather(env)
        self.step = 0
        self.model.train()
        self.method.train()

    def __call__(self, batch: dict[str, Any]) -> None:
        torch.manual_seed(self.step)  # the same dropout masks at the same step on every path
        ctx = StepContext(
            step=self.step, epoch=0, total_steps=10_000, n_groups=3, gather=self.gather,
            scale=self.scaler.scale, model=self.model,
        )  # fmt: skip
        train_step(
            [batch], model=self.model, method=self.method, optimizer=self.optimizer,
            scaler=self.scaler, groups=self.groups, ctx=ctx, lr_scale=1.0, clip=0.8,
            amp_dtype=self.amp_dtype, env=self.env, ddp=self.ddp,
        )  # fmt: skip
        self.step += 1


def worker(rank: int, world_size: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size)
    env = DistEnv(rank=rank, world_size=world_size, local_rank=rank, device=device)
    amp_dtype = resolve_amp(args.amp, device)
    preset = PRESETS[args.preset]
    batch = make_batch(preset["image"], preset["slices"], args.batch, env.device)
    names = args.methods.split(",")
    runners = {(n, p): Runner(n, p, preset, env, amp_dtype) for n in names for p in PATHS}

    def barrier() -> None:
        if cuda:
            torch.cuda.synchronize(device)
        dist.barrier()

    for runner in runners.values():
        for _ in range(args.warmup):
            runner(batch)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runners}
    for r in range(args.rounds):
        order = list(runners) if r % 2 == 0 else list(runners)[::-1]
        for key in order:
            barrier()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                runners[key](batch)
            barrier()  # the slower rank's time: the step is as slow as it
            times[key].append((time.perf_counter() - t0) / args.steps)
    # how far each path's replica drifted from the flat path's (same init, batches, steps)
    drift = {}
    for name, path in runners:
        ref = runners[(name, "flat")].model.state_dict()
        other = runners[(name, path)].model.state_dict()
        drift[(name, path)] = max(float((ref[k] - other[k]).float().abs().max()) for k in ref)
    if rank == 0:
        queue.put((times, drift))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--methods", default="erm,multifair")
    parser.add_argument("--batch", type=int, default=16, help="per process")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="gloo / NCCL")
    parser.add_argument("--world-size", type=int, default=2, help="processes (cuda: GPUs)")
    parser.add_argument("--amp", default="off", choices=["off", "bf16"])
    args = parser.parse_args()

    world_size = args.world_size
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=worker, args=(rank, world_size, port, args, queue))
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    times, drift = queue.get()
    for p in procs:
        p.join()
        assert p.exitcode == 0, f"a worker failed (exit {p.exitcode})"

    where = (
        f"NCCL, {torch.cuda.get_device_name()}"
        if args.device == "cuda"
        else f"gloo, {args.threads} thread(s) each"
    )
    print(
        f"gradient averaging, {world_size} process(es), {where}, preset {args.preset}, "
        f"batch {args.batch} per process, amp {args.amp}, torch {torch.__version__}"
    )
    print(
        f"{args.rounds} alternating rounds x {args.steps} steps per path (wall time, slower rank)"
    )
    print(
        f"{'method':<12}{'path':<12}{'ms/step (median)':>18}{'min':>9}{'vs flat':>9}"
        f"{'max |param - flat|':>20}"
    )
    for name in args.methods.split(","):
        ref = statistics.median(times[(name, "flat")])
        for path in PATHS:
            t = times[(name, path)]
            med = statistics.median(t)
            print(
                f"{name:<12}{path:<12}{1000 * med:>18.1f}{1000 * min(t):>9.1f}{med / ref:>9.3f}"
                f"{drift[(name, path)]:>20.2e}"
            )


if __name__ == "__main__":
    main()
