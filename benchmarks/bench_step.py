"""MultiFair training step vs plain (erm) training step: same model, same batch, same loop.

    python benchmarks/bench_step.py                    # small preset on the CPU (target <= 1.15)
    python benchmarks/bench_step.py --preset paper     # the released architecture, on a GPU
                                                       # (target <= 1.05, peak memory <= 1.02x)

Each method gets its own model (same seed) and optimizer and runs the real step of
`multifair.training.trainer.train_step` (forward, loss, backward, gradient edits, clip, lr
factors, AdamW) on one fixed batch already on the device. The methods alternate in rounds so
that drifting machine load hits both alike; the table shows the median step time of each
method and the ratio of the medians. On CUDA every timed block is closed by a synchronize,
and peak memory is measured per method in a separate pass (one model resident at a time).
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
from typing import Any

import torch

import multifair.methods  # noqa: F401  (registers the methods)
from multifair.data.bundle import ModalitySpec
from multifair.methods.base import StepContext, build_method
from multifair.models import build_model
from multifair.training.config import TrainConfig
from multifair.training.distributed import DistEnv
from multifair.training.inference import resolve_amp
from multifair.training.trainer import build_optimizer, train_step

PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: the demo's image size and OCT depth, the small preset's encoders
    "small": {"image": 64, "slices": 4, "batch": 32, "model": {"preset": "small"}},
    # the released FairVision model: ViT-B/16 fundus + ViT-B/16 over 10 OCT slices, d = 128
    "paper": {"image": 224, "slices": 10, "batch": 32, "model": {"preset": "paper"}},
}


def make_batch(image: int, slices: int, batch: int, device: torch.device) -> dict[str, Any]:
    """A normalised float batch on the device (what `DataBundle.to_device` hands the step)."""
    g = torch.Generator().manual_seed(0)
    label = torch.arange(batch) % 2
    group = (torch.arange(batch) * 7 // 3) % 3  # three groups, both classes in each
    out = {
        "fundus": torch.randn(batch, 3, image, image, generator=g),  # (B, 3, S, S)
        "oct": torch.randn(batch, slices, image, image, generator=g),  # (B, K, S, S)
        "label": label,
        "group": group,
        "attributes": {"race": group},
        "index": torch.arange(batch),
    }
    out = {k: v.to(device) if torch.is_tensor(v) else v for k, v in out.items()}
    out["attributes"] = {"race": out["group"]}
    out["sample_id"] = [f"s{i}" for i in range(batch)]
    return out


class Runner:
    """One method's model, optimizer and step closure."""

    def __init__(self, name: str, preset: dict[str, Any], device: torch.device, amp: str) -> None:
        specs = {
            "fundus": ModalitySpec("fundus", "image", (3, preset["image"], preset["image"]), 3,
                                   (1, preset["image"], preset["image"]), "uint8"),
            "oct": ModalitySpec("oct", "volume", (preset["slices"], preset["image"], preset["image"]),
                                preset["slices"], (preset["slices"], preset["image"], preset["image"]), "uint8"),
        }  # fmt: skip
        torch.manual_seed(0)
        self.model = build_model(preset["model"], specs).to(device)
        self.method = build_method(name, {}, list(specs), 3)
        self.method.setup(self.model)
        self.method.to(device)
        tc = TrainConfig(amp=amp)
        self.optimizer, self.groups = build_optimizer(self.model, self.method, tc, device)
        self.amp_dtype = resolve_amp(amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.env = DistEnv(device=device)
        self.step = 0
        self.model.train()
        self.method.train()

    def __call__(self, batch: dict[str, Any]) -> None:
        ctx = StepContext(
            step=self.step, epoch=0, total_steps=10_000, n_groups=3, gather=lambda t: t,
            scale=self.scaler.scale, model=self.model,
        )  # fmt: skip
        train_step(
            [batch], model=self.model, method=self.method, optimizer=self.optimizer,
            scaler=self.scaler, groups=self.groups, ctx=ctx, lr_scale=1.0, clip=0.8,
            amp_dtype=self.amp_dtype, env=self.env,
        )  # fmt: skip
        self.step += 1


def timed(fn, batch: dict[str, Any], steps: int, device: torch.device, clock: str) -> float:
    """Seconds per step over `steps` steps (device work included). `clock="cpu"` counts this
    process's CPU time instead of wall time: on a shared CPU machine other processes' load
    then inflates neither method."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = now()
    for _ in range(steps):
        fn(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (now() - t0) / steps


def peak_memory(name: str, preset: dict, device: torch.device, amp: str, batch: dict, steps: int) -> int:  # fmt: skip
    gc.collect()
    torch.cuda.empty_cache()
    runner = Runner(name, preset, device, amp)
    runner(batch)  # optimizer state allocated
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        runner(batch)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del runner
    return int(peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--methods", default="erm,multifair", help="first one is the reference")
    parser.add_argument("--rounds", type=int, default=None, help="alternating timing rounds")
    parser.add_argument("--steps", type=int, default=None, help="steps per round and method")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default=None,
        help="wall time, or this process's CPU time (default: wall on CUDA, cpu on CPU)",
    )  # fmt: skip
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))  # fmt: skip
    preset = dict(PRESETS[args.preset])
    if args.batch:
        preset["batch"] = args.batch
    cuda = device.type == "cuda"
    rounds = args.rounds or (20 if cuda else 10)
    steps = args.steps or (10 if cuda else 3)
    names = args.methods.split(",")
    clock = args.clock or ("wall" if cuda else "cpu")
    if clock == "cpu" and cuda:
        parser.error("--clock cpu measures host CPU time only; use wall on CUDA")
    batch = make_batch(preset["image"], preset["slices"], preset["batch"], device)

    runners = {n: Runner(n, preset, device, args.amp) for n in names}
    for runner in runners.values():
        for _ in range(args.warmup):
            runner(batch)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]  # alternate who goes first
        for n in order:
            times[n].append(timed(runners[n], batch, steps, device, clock))
    amp_dtype = runners[names[0]].amp_dtype
    del runners

    peaks = {}
    if cuda:
        for n in names:
            peaks[n] = peak_memory(n, preset, device, args.amp, batch, steps=3)

    where = torch.cuda.get_device_name(device) if cuda else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"  # fmt: skip
    print(f"training step, preset {args.preset}: batch {preset['batch']}, fundus 3x{preset['image']}^2, "
          f"OCT {preset['slices']}x{preset['image']}^2, amp {amp_dtype or 'off'}, {where}, torch {torch.__version__}")  # fmt: skip
    print(
        f"{rounds} alternating rounds x {steps} steps per method (after {args.warmup} warm-up steps)"
    )
    ref = statistics.median(times[names[0]])
    head = f"{'method':<20}{'ms/step (median)':>18}{'min':>9}{'max':>9}{'ratio':>8}"
    if cuda:
        head += f"{'peak MiB':>11}{'mem ratio':>11}"
    print(head)
    for n in names:
        med = statistics.median(times[n])
        line = f"{n:<20}{1000 * med:>18.1f}{1000 * min(times[n]):>9.1f}{1000 * max(times[n]):>9.1f}{med / ref:>8.3f}"  # fmt: skip
        if cuda:
            line += f"{peaks[n] / 2**20:>11.0f}{peaks[n] / peaks[names[0]]:>11.3f}"
        print(line)
    target = 1.05 if cuda else 1.15
    for n in names[1:]:
        ratio = statistics.median(times[n]) / ref
        fastest = min(times[n]) / min(times[names[0]])  # least disturbed by other load
        verdict = "meets" if ratio <= target else "MISSES"
        print(f"{n} / {names[0]}: {ratio:.3f} median, {fastest:.3f} fastest rounds "
              f"({verdict} the target <= {target} on {'a GPU' if cuda else 'CPU'})")  # fmt: skip


if __name__ == "__main__":
    main()
