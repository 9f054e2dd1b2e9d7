"""The one training loop. Every method runs through it; a method changes the step only through
the hooks of `multifair.methods.base.Method`, called in this order per optimisation step:

    forward -> loss -> backward (per micro-batch; under torchrun DDP averages the gradients
    during the last one) -> unscale_
    -> modulate_gradients -> clip -> lr_factors -> lr = scheduled_lr * factor -> optimizer.step

Epochs: on_epoch_start -> steps -> on_epoch_end -> validation (metrics.summarize) -> model
selection (val AUC or ES-AUC) -> atomic checkpoint. After the last epoch the selected checkpoint
is evaluated once on the test split and predictions_{split}.csv and metrics.json are written.

Learning rates: one AdamW group per modality encoder, one for the rest (projections, fusion,
head, method parameters), one for the auxiliary heads (their own lr and weight decay, as
released). Each step every group's lr is set to base_lr * schedule(step) and the encoder groups
are multiplied by the method's `lr_factors`. On CPU the lrs are Python floats (a factor tensor
is read with `float()`, which costs nothing without an accelerator). On CUDA the lrs are
0-d device tensors updated in place and AdamW runs `fused=True`, which accepts tensor lrs, so a
factor that is a device tensor never forces a host synchronisation.

Host synchronisation: none per step except every `log_every` steps, when the window's loss
parts and signals are read (one `.tolist()`), and the non-finite-loss check happens there too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import random
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from multifair.console import bars_enabled
from multifair.errors import Stopped, UserError
from multifair.methods.base import (
    METHODS,
    LossOutput,
    Method,
    StepContext,
    build_method,
    supporting_methods,
)
from multifair.training import checkpoint, distributed, run
from multifair.training.config import TrainConfig, method_params, to_dict
from multifair.training.distributed import DistEnv
from multifair.training.inference import (
    autocast,
    evaluate_predictions,
    make_loader,
    predict,
    resolve_amp,
    val_record,
    write_predictions,
)
from multifair.training.logging import RunLogger, WindowMeter, dump_json, truncate_log


class NonFiniteLossError(UserError):
    """The loss became NaN/inf: the run stops and keeps the last good checkpoint."""


# ---------------------------------------------------------------------------------------
# optimizer and schedule (AMP and loaders: training/inference.py)


@dataclass
class ParamGroup:
    name: str  # "encoder/<modality>", "rest" or "aux"
    modality: str | None  # set for encoder groups: the target of lr_factors
    base_lr: float


def build_optimizer(
    model: nn.Module, method: nn.Module, train: TrainConfig, device: torch.device
) -> tuple[torch.optim.AdamW, list[ParamGroup]]:
    """AdamW with one group per modality encoder, one for the rest, one for the auxiliary heads."""
    trainable = lambda ps: [p for p in ps if p.requires_grad]  # noqa: E731
    specs: list[tuple[ParamGroup, list[nn.Parameter], float]] = []
    for modality, params in model.modality_parameters().items():
        specs.append(
            (
                ParamGroup(f"encoder/{modality}", modality, train.lr),
                trainable(params),
                train.weight_decay,
            )
        )
    rest = trainable(model.other_parameters()) + trainable(method.parameters())
    specs.append((ParamGroup("rest", None, train.lr), rest, train.weight_decay))
    specs.append(
        (
            ParamGroup("aux", None, train.aux_lr),
            trainable(model.aux_parameters()),
            train.aux_weight_decay,
        )
    )
    specs = [s for s in specs if s[1]]  # a frozen encoder has no group

    # every trainable parameter in exactly one group: the model's partition is a contract
    grouped = [id(p) for _, ps, _ in specs for p in ps]
    assert len(grouped) == len(set(grouped)), "a parameter is in two optimizer groups"
    expected = {id(p) for p in [*model.parameters(), *method.parameters()] if p.requires_grad}
    assert set(grouped) == expected, (
        f"{len(expected - set(grouped))} trainable parameters are in no optimizer group: "
        "modality_parameters/other_parameters/aux_parameters must cover the model"
    )

    fused = device.type == "cuda"
    lr = (lambda x: torch.tensor(x, device=device)) if fused else float
    groups = [
        {"params": ps, "lr": lr(g.base_lr), "weight_decay": wd, "name": g.name}
        for g, ps, wd in specs
    ]
    optimizer = torch.optim.AdamW(groups, betas=train.betas, eps=train.eps, fused=fused or None)
    return optimizer, [g for g, _, _ in specs]


def lr_tensors_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """After `load_state_dict` (mapped to the CPU) put tensor lrs back on the device."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"] = group["lr"].to(device)


class Schedule:
    """lr multiplier: linear warm-up, then cosine (or constant), times a plateau factor that
    drops when the validation selection metric stops improving. A pure function of the step
    plus a little plateau state, so it never compounds with the per-step lr factors."""

    def __init__(self, train: TrainConfig, total_steps: int) -> None:
        self.kind = train.schedule
        self.warmup = train.warmup_steps
        self.total = max(1, total_steps)
        self.min_ratio = train.min_lr_ratio
        self.factor = train.plateau_factor
        self.patience = train.plateau_patience
        self.plateau_scale = 1.0
        self.best = -math.inf
        self.bad_epochs = 0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup * self.plateau_scale
        if self.kind == "cosine":
            progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
            cos = 0.5 * (1.0 + math.cos(math.pi * progress))
            return self.min_ratio + (1.0 - self.min_ratio) * cos
        return self.plateau_scale

    def epoch_end(self, metric: float) -> None:
        if self.kind != "plateau" or not math.isfinite(metric):
            return
        if metric > self.best:
            self.best, self.bad_epochs = metric, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.plateau_scale *= self.factor
            self.bad_epochs = 0

    def state_dict(self) -> dict[str, float]:
        return {
            "plateau_scale": self.plateau_scale,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
        }

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.plateau_scale = float(state["plateau_scale"])
        self.best = float(state["best"])
        self.bad_epochs = int(state["bad_epochs"])


# ---------------------------------------------------------------------------------------
# one optimisation step


class MethodStep(nn.Module):
    """The method's forward and loss of one micro-batch as one module call.

    DistributedDataParallel learns which backward to reduce from calls through its wrapper, and
    methods reach the model from both hooks (`loss` may run the fusion or a head again), so the
    trainer wraps this pair, not the model. The model and the method are its submodules: every
    trainable parameter of the step is reduced."""

    def __init__(self, model: nn.Module, method: Method) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, batch: Mapping[str, Any], ctx: StepContext) -> tuple[Any, LossOutput]:
        out = self.method.forward(self.model, batch)
        return out, self.method.loss(out, batch, ctx)


@dataclass
class StepResult:
    loss: LossOutput  # of the last micro-batch
    stats: dict[str, Tensor | float]  # everything to log: parts, signals, edit stats, factors
    # L2 norm of each encoder's parameter change in this step (only when measure_update)
    update_norms: dict[str, Tensor] = field(default_factory=dict)


def train_step(
    micro_batches: Sequence[Mapping[str, Any]],
    *,
    model: nn.Module,
    method: Method,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    groups: Sequence[ParamGroup],
    ctx: StepContext,
    lr_scale: float,
    clip: float | None,
    amp_dtype: torch.dtype | None,
    env: DistEnv,
    measure_update: bool = False,
    ddp: nn.parallel.DistributedDataParallel | None = None,
) -> StepResult:
    """One optimisation step over `micro_batches` (already on the device), hooks in protocol order.

    With gradient accumulation, the gradient edits and lr factors of the step come from the
    LAST micro-batch's loss signals (each micro-batch's loss is divided by their number), and
    method state advances only there (`ctx.advance` is False for the others).

    `ddp`: the `MethodStep` of this model and method wrapped in DistributedDataParallel (under
    torchrun), which averages the gradients over ranks, bucket by bucket while the backward pass
    runs; without it the step is a one-process step.

    `measure_update` also returns each encoder's update norm ||theta_after - theta_before||
    (what a step-size factor changes and a gradient factor under AdamW does not); it copies the
    encoder parameters, so the loop asks for it only on logging steps."""
    device = env.device
    params = [p for g in optimizer.param_groups for p in g["params"]]
    optimizer.zero_grad(set_to_none=True)
    forward_and_loss = ddp if ddp is not None else MethodStep(model, method)
    last = len(micro_batches) - 1
    for i, batch in enumerate(micro_batches):
        micro_ctx = ctx if i == last else dataclasses.replace(ctx, advance=False)
        # DDP averages gradients during the LAST micro-batch's backward (the others accumulate)
        sync = ddp.no_sync() if ddp is not None and i != last else contextlib.nullcontext()
        with sync:
            with autocast(device, amp_dtype):
                # ONE forward pass, then LossOutput(total, parts, signals)
                out, loss = forward_and_loss(batch, micro_ctx)
            # default: ctx.scale(loss.total).backward()
            method.backward(loss, out, batch, micro_ctx)
    # here every rank holds the same averaged gradients: the edits below see what one process
    # training on the global batch would see (average, then modify)
    if scaler.is_enabled():
        scaler.unscale_(optimizer)  # fp16: gradients in true units before any edit
    edit_stats = method.modulate_gradients(model, loss, ctx)  # OGM-GE, CGGM, MultiFair, ...
    stats: dict[str, Tensor | float] = {"loss/total": loss.total.detach()}
    if clip is not None:
        stats["grad_norm"] = nn.utils.clip_grad_norm_(params, clip)  # AFTER the gradient edits
    factors = method.lr_factors(loss, ctx) or {}
    for group, info in zip(optimizer.param_groups, groups):
        # lr = scheduled_lr * factor, set after the schedule; only encoder groups get factors
        factor = factors.get(info.modality) if info.modality is not None else None
        scheduled = info.base_lr * lr_scale
        if isinstance(group["lr"], Tensor):  # CUDA: fused AdamW reads a device tensor, no sync
            group["lr"].fill_(scheduled)
            if factor is not None:
                group["lr"].mul_(factor)
        else:
            group["lr"] = scheduled * (float(factor) if factor is not None else 1.0)
    before: dict[str, list[Tensor]] = {}
    if measure_update:
        before = {
            info.modality: [p.detach().clone() for p in group["params"]]
            for group, info in zip(optimizer.param_groups, groups)
            if info.modality is not None
        }
    if scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    update_norms = {}
    for group, info in zip(optimizer.param_groups, groups):
        if info.modality in before:
            deltas = [
                (p.detach() - b).float().norm()
                for p, b in zip(group["params"], before[info.modality])
            ]
            update_norms[info.modality] = torch.stack(deltas).norm() if deltas else torch.zeros(())

    stats.update({f"loss/{k}": v for k, v in loss.parts.items()})
    stats.update(loss.signals)
    stats.update(edit_stats)
    stats.update({f"lr_factor/{m}": f for m, f in factors.items()})
    return StepResult(loss, stats, update_norms)


# ---------------------------------------------------------------------------------------
# the run


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, Any] | None  # None when the run stopped early (train.stop_after_epoch)
    epochs_done: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def run_modalities(cfg: Any, data: Any) -> list[str]:
    """The modalities a run's model reads: the data's, or the method's choice (unimodal)."""
    method_cls = METHODS.get(cfg.method.name)
    params = method_cls.Params(**method_params(cfg))
    return method_cls.model_modalities(params, list(data.modalities))


def build_model_and_method(
    cfg: Any, data: Any, modalities: list[str], missing: bool, device: torch.device
) -> tuple[nn.Module, Method]:
    """A run's model and method on `device`, from its resolved config and data (training, and
    `evaluate`/`predict` before loading a checkpoint). `missing`: the model gets the learned
    missing-modality tokens."""
    from multifair.models import build_model

    model = build_model(
        cfg.model,
        {m: data.modalities[m] for m in modalities},
        dataset_modalities=list(data.modalities),
        n_classes=data.n_classes,
        missing=missing,
    ).to(device)
    method = build_method(
        cfg.method.name, method_params(cfg), modalities, data.n_groups, data.n_classes
    )
    method.setup(model)  # parameters whose shapes depend on the model (FIN)
    method.to(device)
    return model, method


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002  (legacy global RNG, for user code)
    torch.manual_seed(seed)


def train(cfg: Any, *, resume_dir: str | Path | None = None) -> TrainResult:
    """Train `cfg` (a resolved RunConfig) into a new run directory, or continue `resume_dir`.

    Works in one process or under torchrun (one process per device); only rank 0 writes."""
    env = distributed.setup(cfg.train.device)
    held: list[run.RunLock] = []  # the run directory's lock, released whatever happens
    try:
        return _train(cfg, env, resume_dir, held)
    finally:
        for lock in held:
            lock.release()
        distributed.cleanup(env)


def _train(
    cfg: Any, env: DistEnv, resume_dir: str | Path | None, held: list[run.RunLock]
) -> TrainResult:
    from multifair.data import build_data

    tc = cfg.train
    device = env.device
    if tc.threads is not None:
        torch.set_num_threads(tc.threads)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    # run directory: rank 0 creates it, every rank learns its path
    if resume_dir is not None:
        run_dir = Path(resume_dir)
        if env.is_main:
            held.append(run.RunLock(run_dir))
    elif env.is_main:
        run_dir, lock = run.new_run_dir(cfg.output.dir, cfg.method.name)
        held.append(lock)
    else:
        run_dir = None
    run_dir = Path(distributed.broadcast_object(str(run_dir), env))
    ckpt_dir = run_dir / "checkpoints"
    if env.is_main and resume_dir is None:
        resolved = to_dict(cfg)
        resolved["output"]["dir"] = str(run_dir)
        run.write_config(resolved, run_dir)
        run.write_env(run.environment(device, env.world_size), run_dir)

    # data: rank 0 first (it may build the preprocessing cache), then the others read it
    seed_everything(tc.seed)
    if env.is_main:
        data = build_data(cfg.data)
    distributed.barrier(env)
    if not env.is_main:
        data = build_data(cfg.data)
    attribute, n_groups = data.train_attribute, data.n_groups

    # model and method: same seed on every rank, then rank 0's weights everywhere
    method_cls = METHODS.get(cfg.method.name)
    modalities = run_modalities(cfg, data)
    # only the modalities this model reads count (a unimodal model of a complete modality
    # trains on data where another one is missing)
    missing = bool(data.lacking & set(modalities))
    if missing and not method_cls.supports_missing:
        raise UserError(
            f"method {cfg.method.name!r} does not support missing modalities (some samples lack "
            f"one: {data.describe_missing()}); use a method that does ({supporting_methods()}) "
            "or set data.missing_modalities to drop or impute"
        )
    model, method = build_model_and_method(cfg, data, modalities, missing, device)
    distributed.broadcast_state(model, env)
    distributed.broadcast_state(method, env)
    optimizer, groups = build_optimizer(model, method, tc, device)
    ddp = distributed.wrap_ddp(MethodStep(model, method), env)  # None in one process
    amp_dtype = resolve_amp(tc.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    # per-rank stream for dropout and on-device augmentation
    seed_everything(tc.seed + env.rank)

    train_loader, train_sampler = make_loader(
        data,
        "train",
        env,
        batch_size=tc.batch_size,
        train=True,
        seed=tc.seed,
        drop_last=tc.drop_last,
    )
    if len(train_loader) < tc.accumulate:
        raise UserError(
            f"train.batch_size: the training split ({len(data.datasets['train'])} samples over "
            f"{env.world_size} process(es)) gives {len(train_loader)} batches of {tc.batch_size}, "
            f"fewer than train.accumulate={tc.accumulate}; lower the batch size"
        )
    eval_bs = tc.eval_batch_size or tc.batch_size
    eval_loader = lambda split: make_loader(  # noqa: E731
        data, split, env, batch_size=eval_bs, train=False, seed=tc.seed
    )[0]
    val_loader = eval_loader("val")
    steps_per_epoch = len(train_loader) // tc.accumulate
    total_steps = steps_per_epoch * tc.epochs
    schedule = Schedule(tc, total_steps)
    to_device = data.to_device

    def predict_on(loader: Any) -> Any:
        """The model's predictions on one split's loader (gathered from every rank)."""
        return predict(
            model,
            method,
            loader,
            to_device=to_device,
            env=env,
            amp_dtype=amp_dtype,
            classes=data.classes,
        )

    data_state = data.state()  # preprocessing fitted on train: `predict` on new data reuses it
    frozen = checkpoint.frozen_signature(model)  # not stored in checkpoints; checked on load

    start_epoch, step = 0, 0
    best: dict[str, Any] = {"metric": -math.inf, "epoch": -1}
    timing = {"seconds": 0.0, "steps": 0}
    history: list[dict[str, Any]] = []
    partial: dict[str, Any] | None = None  # an epoch stopped part-way (SIGTERM), to finish
    if resume_dir is not None and (ckpt_dir / "last.pt").is_file():
        state = checkpoint.load(ckpt_dir / "last.pt")
        checkpoint.load_model(model, state, ckpt_dir / "last.pt")
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        lr_tensors_to(optimizer, device)
        scaler.load_state_dict(state["scaler"])
        schedule.load_state_dict(state["schedule"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        best, timing, history = dict(state["best"]), dict(state["timing"]), list(state["history"])
        partial = state.get("partial")
        checkpoint.set_rng_state(
            state["rng"][env.rank] if env.rank < len(state["rng"]) else state["rng"][0]
        )

    if env.is_main and resume_dir is not None:
        truncate_log(run_dir / "log.jsonl", step, start_epoch)
    logger = RunLogger(run_dir, enabled=env.is_main, tensorboard=tc.tensorboard)
    meter = WindowMeter(modalities, reduce=distributed.make_mean(env))
    gather = distributed.make_gather(env)
    scale = (lambda t: scaler.scale(t / tc.accumulate)) if tc.accumulate > 1 else scaler.scale
    # what epoch hooks may read: the training batches (PMR prototypes) and the training
    # split's samples per group of the training attribute (group reweighting)
    train_codes = data.groups("train")
    extras = {
        "train_loader": train_loader,
        "to_device": to_device,
        "device": device,
        "amp_dtype": amp_dtype,
        "group_counts": np.bincount(train_codes[train_codes >= 0], minlength=n_groups)[:n_groups],
    }
    make_ctx = lambda epoch, step: StepContext(  # noqa: E731
        step=step,
        epoch=epoch,
        total_steps=total_steps,
        n_groups=n_groups,
        gather=gather,
        scale=scale,
        model=model,
        extras=extras,
    )
    if env.is_main and start_epoch < tc.epochs:
        print(
            f"training {cfg.method.name} on {len(data.datasets['train'])} samples, modalities "
            f"{modalities}, {steps_per_epoch} steps x {tc.epochs} epochs on {device}"
            f"{f' x{env.world_size}' if env.distributed else ''}"
            f"{f', amp {amp_dtype}' if amp_dtype else ''} -> {run_dir}",
            flush=True,
        )

    def save_last(epochs_done: int, partial: dict[str, Any] | None = None) -> None:
        """checkpoints/last.pt: everything --resume needs (`partial`: the epoch in progress)."""
        rng = distributed.all_gather_objects(checkpoint.rng_state(), env)
        if env.is_main:
            checkpoint.save_atomic(
                {
                    "format": checkpoint.FORMAT_VERSION,
                    "epoch": epochs_done,
                    "step": step,
                    **checkpoint.model_state(model, frozen),
                    "method": method.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "schedule": schedule.state_dict(),
                    "rng": rng,
                    "best": best,
                    "timing": timing,
                    "history": history,
                    "sampler_seed": tc.seed,
                    "data_state": data_state,
                    **({"partial": partial} if partial is not None else {}),
                },
                ckpt_dir / "last.pt",
            )

    # SIGTERM (a scheduler's pre-emption; torchrun passes one on to every rank) finishes the
    # step, checkpoints and stops. Under torchrun the ranks agree at log steps (`any_rank`, where
    # the loop syncs anyway), so all of them stop after the same step.
    stop = _StopRequest(enabled=True)
    try:
        for epoch in range(start_epoch, tc.epochs):
            # ---- train one epoch ----
            model.train()
            method.train()
            train_sampler.set_epoch(epoch)
            train_loader.generator.manual_seed(tc.seed * 1_000_003 + epoch)
            batches: Iterator = iter(train_loader)
            if partial is None:
                epoch_stats = dict(method.on_epoch_start(make_ctx(epoch, step)) or {})
                loss_sum = torch.zeros((), device=device)
                # the first non-finite step
                first_bad = torch.full((), -1, dtype=torch.long, device=device)
                skip, seconds_before = 0, 0.0
            else:  # resumed part-way: the epoch's start ran; skip the batches already trained on
                epoch_stats, skip = dict(partial["epoch_stats"]), int(partial["steps"])
                loss_sum = partial["loss_sum"].to(device)
                first_bad = partial["first_bad"].to(device)
                seconds_before = float(partial["seconds"])
                meter.load_state_dict(partial["meter"], device)
                batches = itertools.islice(batches, skip * tc.accumulate, None)
                partial = None
            bar = _progress(
                steps_per_epoch, f"epoch {epoch + 1}/{tc.epochs}", env.is_main and tc.progress
            )
            bar.update(skip)
            t0 = time.perf_counter() - seconds_before
            # `done`: the steps of this epoch taken, this one included
            for done in range(skip + 1, steps_per_epoch + 1):
                micro = [to_device(next(batches), device, train=True) for _ in range(tc.accumulate)]
                ctx = make_ctx(epoch, step)
                result = train_step(
                    micro,
                    model=model,
                    method=method,
                    optimizer=optimizer,
                    scaler=scaler,
                    groups=groups,
                    ctx=ctx,
                    lr_scale=schedule(step),
                    clip=tc.clip,
                    amp_dtype=amp_dtype,
                    env=env,
                    measure_update=(step + 1) % tc.log_every == 0,
                    ddp=ddp,
                )
                total = result.loss.total.detach()
                loss_sum += total
                bad = (first_bad < 0) & ~torch.isfinite(total)
                first_bad = torch.where(bad, torch.full_like(first_bad, step), first_bad)
                meter.add(result.stats)
                step += 1
                if step % tc.log_every == 0:
                    record = {
                        "kind": "step",
                        "step": step,
                        "epoch": epoch,
                        "lr": tc.lr * schedule(step - 1),
                        **meter.flush(),
                        # the last step of the window (a sample, not a window mean)
                        **{f"update_norm/{m}": float(v) for m, v in result.update_norms.items()},
                    }
                    logger.log(record)
                    _check_finite(first_bad, epoch, record, ckpt_dir)
                    bar.set_postfix(loss=f"{record['loss/total']:.4f}")
                bar.update()
                if done < steps_per_epoch and _stop_now(stop, env, step % tc.log_every == 0):
                    bar.close()
                    _check_finite(first_bad, epoch, {}, ckpt_dir)  # never checkpoint a NaN
                    save_last(
                        epoch,
                        partial={
                            "steps": done,
                            "loss_sum": loss_sum.detach().cpu(),
                            "first_bad": first_bad.cpu(),
                            "seconds": time.perf_counter() - t0,
                            "epoch_stats": _plain(epoch_stats),
                            "meter": meter.state_dict(),
                        },
                    )
                    raise Stopped(
                        f"stopped by {stop.name or 'a signal to another rank'} after step "
                        f"{step} (epoch {epoch + 1}, step {done}/{steps_per_epoch}), "
                        f"checkpointed; resume with multifair train --resume {run_dir}",
                        exit_code=128 + (stop.signal or signal.SIGTERM),
                    )
            bar.close()
            epoch_stats.update(method.on_epoch_end(make_ctx(epoch, step)) or {})
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            timing["seconds"] += seconds
            timing["steps"] += steps_per_epoch
            _check_finite(first_bad, epoch, {}, ckpt_dir)

            # ---- validate, select, checkpoint ----
            distributed.broadcast_state(model, env)  # BatchNorm statistics of rank 0 everywhere
            val_preds = predict_on(val_loader)
            val = evaluate_predictions(val_preds, data.group_names, attribute)
            val_groups = val_preds.attributes.get(attribute)  # aligned with the predictions
            epoch_stats.update(method.on_validation(val_preds, val_groups) or {})
            metric = _selection_metric(val, attribute, tc.select_by)
            schedule.epoch_end(metric)
            # NaN never wins: a degenerate epoch cannot be selected; nor one in the burn-in
            better = epoch >= tc.select_from and metric > best["metric"]
            record = {
                "kind": "epoch",
                "epoch": epoch,
                "step": step,
                "train_loss": float(loss_sum) / steps_per_epoch,
                "val": val_record(val, attribute, val_preds, modalities),
                "selected": better,
                # what the method's epoch hooks reported (prototypes, windows, ...)
                **({"method": _plain(epoch_stats)} if epoch_stats else {}),
                "seconds": seconds,
            }
            if better:
                best = {"metric": metric, "epoch": epoch}
                if env.is_main:
                    checkpoint.save_atomic(
                        {
                            "format": checkpoint.FORMAT_VERSION,
                            "epoch": epoch + 1,
                            **checkpoint.model_state(model, frozen),
                            "method": method.state_dict(),
                            "data_state": data_state,
                        },
                        ckpt_dir / "best.pt",
                    )
            history.append(record)
            logger.log(record)
            if env.is_main:
                print(_epoch_line(record, tc.select_by), flush=True)  # a log file sees it now
            save_last(epoch + 1)
            distributed.barrier(env)
            if (
                tc.stop_after_epoch is not None
                and epoch + 1 >= tc.stop_after_epoch
                and epoch + 1 < tc.epochs
            ):
                if env.is_main:
                    print(
                        f"stopped after epoch {epoch + 1} (train.stop_after_epoch); continue with --resume {run_dir}"
                    )
                return TrainResult(run_dir, None, epoch + 1, history)

        # ---- replicas in sync? (every rank's final weights and method state) ----
        digests = distributed.all_gather_objects(
            [distributed.state_digest(model), distributed.state_digest(method)], env
        )
        if any(d != digests[0] for d in digests):
            raise RuntimeError(f"ranks finished with different weights: {digests}")

        # ---- the selected checkpoint, evaluated once on test ----
        if best["epoch"] < 0:
            raise UserError(
                f"no epoch had a finite validation {tc.select_by}: the validation split needs both "
                "classes (and, for es_auc, groups with both classes)"
            )
        selected = checkpoint.load(ckpt_dir / "best.pt")
        checkpoint.load_model(model, selected, ckpt_dir / "best.pt")
        method.load_state_dict(selected["method"])
        posthoc: dict[str, Any] = {}
        if method.fits_after_selection:
            val_preds = predict_on(val_loader)
            train_preds = predict_on(eval_loader("train")) if method.fits_on_train else None
            posthoc = (
                method.on_selected(
                    val_preds,
                    val_preds.attributes.get(attribute),
                    train_preds,
                    None if train_preds is None else train_preds.attributes.get(attribute),
                )
                or {}
            )
            if env.is_main:  # the checkpoint carries the fit: `multifair predict` reproduces it
                selected["method"] = method.state_dict()
                checkpoint.save_atomic(selected, ckpt_dir / "best.pt")
        summaries: dict[str, Any] = {}
        aux_auc: dict[str, dict[str, float]] = {}
        for split in dict.fromkeys(["val", "test", *cfg.output.predictions]):
            preds = predict_on(val_loader if split == "val" else eval_loader(split))
            if split in ("val", "test"):
                n_boot = cfg.output.n_boot if split == "test" else 0
                summaries[split] = evaluate_predictions(
                    preds,
                    data.group_names,
                    attribute,
                    n_boot=n_boot,
                    seed=tc.seed,
                    min_group_size=cfg.data.min_group_size,
                )
                aux_auc[split] = val_record(summaries[split], attribute, preds, modalities)[
                    "aux_auc"
                ]
            if env.is_main and split in cfg.output.predictions:
                write_predictions(
                    preds, split, data.group_names, run_dir / f"predictions_{split}.csv"
                )
        metrics = {
            "method": cfg.method.name,
            "variant": getattr(cfg.method, "variant", None) or cfg.method.name,
            "select_by": tc.select_by,
            "select_from": tc.select_from,
            "selected_epoch": best["epoch"],
            "attribute": attribute,
            # intersectional attributes: their groups, training sizes and merges (the size rule)
            **({"intersections": data.intersections} if data.intersections else {}),
            "val": summaries["val"],
            "test": summaries["test"],
            # each auxiliary (single-modality) head's AUC: how much each modality was learned
            "aux_auc": aux_auc,
            "time_per_step_s": timing["seconds"] / max(1, timing["steps"]),
            **_peak_memory(device),
            "uses_attribute_at_test": bool(method.uses_attribute_at_test),
            **({"posthoc": posthoc} if posthoc else {}),
            "tau": getattr(cfg.method, "tau", None),
            "world_size": env.world_size,
            # sha256 of each rank's final model state (identical on every rank)
            "replica_digests": [d[0] for d in digests],
        }
        if env.is_main:
            dump_json(metrics, run_dir / "metrics.json")
        return TrainResult(run_dir, metrics, tc.epochs, history)
    finally:
        stop.restore()
        logger.close()


# ---------------------------------------------------------------------------------------
# small helpers of the loop


def _check_finite(first_bad: Tensor, epoch: int, record: Mapping[str, Any], ckpt_dir: Path) -> None:
    bad_step = int(first_bad)  # host sync: only at log steps and epoch ends
    if bad_step < 0:
        return
    parts = ", ".join(f"{k[5:]}={v:.4g}" for k, v in record.items() if k.startswith("loss/"))
    last = ckpt_dir / "last.pt"
    kept = (
        f"the last good checkpoint is {last}"
        if last.is_file()
        else "no epoch completed, so no checkpoint was written"
    )
    raise NonFiniteLossError(
        f"the training loss became non-finite at step {bad_step} (epoch {epoch + 1})"
        f"{f' [{parts}]' if parts else ''}; stopped - {kept}. Try a lower train.lr, "
        "train.amp=off, or check the inputs for NaN"
    )


def _plain(stats: Mapping[str, Any]) -> dict[str, Any]:
    """Epoch-hook stats as JSON-able numbers (tensors read once per epoch)."""
    return {k: v.tolist() if isinstance(v, Tensor) else v for k, v in stats.items()}


def _selection_metric(summary: Mapping[str, Any], attribute: str, select_by: str) -> float:
    value = (
        summary["overall"]["auc"]
        if select_by == "auc"
        else summary["attributes"][attribute]["es_auc"]
    )
    return float(value) if value is not None and math.isfinite(value) else -math.inf


def _epoch_line(record: Mapping[str, Any], select_by: str) -> str:
    val = record["val"]
    fmt = lambda x: "  n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"  # noqa: E731
    mark = " *" if record["selected"] else ""
    return (
        f"epoch {record['epoch'] + 1}: train loss {record['train_loss']:.4f} | val AUC "
        f"{fmt(val['auc'])} ES-AUC {fmt(val['es_auc'])} DPD {fmt(val['dpd'])} DEOdds "
        f"{fmt(val['deodds'])} | {record['seconds']:.1f}s{mark}"
    )


def _peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak device memory on CUDA; the process's peak resident set on CPU (says which)."""
    if device.type == "cuda":
        return {
            "peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
            "peak_memory_kind": "cuda_max_allocated",
        }
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return {"peak_memory_bytes": int(rss), "peak_memory_kind": "process_max_rss"}
    except ImportError:  # not on Windows
        return {"peak_memory_bytes": None, "peak_memory_kind": None}


def _stop_now(stop: _StopRequest, env: DistEnv, log_step: bool) -> bool:
    """Stop after this step? In one process: when a SIGTERM came. Under torchrun: at log steps
    only, when one came to ANY rank (every rank takes part, so all leave together)."""
    if not env.distributed:
        return stop.signal is not None
    return log_step and distributed.any_rank(stop.signal is not None, env)


class _StopRequest:
    """Remembers a SIGTERM instead of dying of it, so the loop can finish the step it is in,
    write a checkpoint and stop (exit 143). Installed only in the main thread (every rank's,
    under torchrun)."""

    def __init__(self, enabled: bool) -> None:
        self.signal: int | None = None
        self._previous: Any = None
        self._installed = enabled and threading.current_thread() is threading.main_thread()
        if self._installed:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, desc: str, enabled: bool):
    # a bar only on a terminal: in a log file its redraws are '\r' frames, and the epoch line
    # printed after it is the log
    if not bars_enabled(enabled):
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
