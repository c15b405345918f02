"""The training loop, in reading order: set-up (one Run object), one training step, the periodic actions, the loop.

Each step's randomness (timesteps, noise, label dropout) is seeded from (seed, step), so a resumed run repeats
exactly what an uninterrupted run would have done; timesteps and noise are drawn for the whole global batch and
sliced per rank, so the run does not depend on how the batch is split across processes.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader

import fcdm
from fcdm import distributed
from fcdm.data import GlobalBatchSampler
from fcdm.distributed import DistInfo
from fcdm.ema import SNAPSHOT_DIR, PowerEMA
from fcdm.models.flops import model_macs
from fcdm.objectives import build_objective
from fcdm.vae import encode

from . import resume
from .builders import build_dataset, build_model, build_training_optimizer, build_vae, wrap_model
from .ema import EMA
from .evaluation import build_evaluator
from .guards import StopRequest, check_step, requeue_on_slurm
from .run_logger import ProgressWindow, RunLogger
from .previews import sample_grid, save_png
from .state import TrainState, step_seed
from .trackers import open_trackers


# ---- set-up --------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """Everything set-up builds, read by the training step and the periodic actions."""

    args: argparse.Namespace       # the parsed flags, completed by the builders (input size, channels, backend, ...)
    info: DistInfo
    run_dir: str
    log: RunLogger
    dataset: object
    vae: object                    # a diffusers AutoencoderKL, or None
    objective: object
    model: torch.nn.Module         # unwrapped (or FSDP-sharded in place): what is saved, loaded and clipped
    wrapped: torch.nn.Module       # what the forward runs: DDP, torch.compile, or the model itself
    ema: EMA
    opt: torch.optim.Optimizer
    amp_dtype: torch.dtype | None  # bf16 autocast, or None for fp32
    micro_batch: int               # images per process per forward
    total_steps: int
    state: TrainState = field(default_factory=TrainState)
    sampler: GlobalBatchSampler | None = None  # set once the state is restored: the data restarts at its step
    loader: DataLoader | None = None
    evaluator: object = None       # callable(ema_model) -> metrics, or None
    posthoc: PowerEMA | None = None  # --posthoc-ema's power-function EMAs

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.run_dir, "checkpoints")


def lr_at(args, step: int) -> float:
    """Linear warmup over --warmup-steps, then constant (the paper uses a constant 1e-4)."""
    return args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr


def micro_batch_size(args, world_size: int) -> int:
    """Images per process per forward; ValueError when the global batch does not split evenly."""
    if args.global_batch_size % (world_size * args.grad_accum):
        raise ValueError(f"--global-batch-size {args.global_batch_size} does not split evenly over {world_size} "
                         f"processes x --grad-accum {args.grad_accum}; use a multiple of "
                         f"{world_size * args.grad_accum}")
    return args.global_batch_size // (world_size * args.grad_accum)


def total_steps(args, dataset_size: int) -> int:
    steps_per_epoch = dataset_size // args.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the dataset has {dataset_size} items, fewer than one global batch of "
                         f"{args.global_batch_size}")
    return min(args.max_train_steps, args.epochs * steps_per_epoch)


def setup(args) -> Run:
    """Processes, data, model, EMA and optimiser, resumed from a checkpoint when one is asked for, and the evaluator."""
    info = distributed.init(args.device, require_group=args.fsdp, timeout_minutes=args.dist_timeout_minutes)
    micro_batch = micro_batch_size(args, info.world_size)
    if args.backend is not None:
        fcdm.set_backend(args.backend)
    args.backend = fcdm.get_backend()  # what runs (and what the checkpoint records): flag, FCDM_BACKEND or auto
    if info.device.type == "cuda":  # TF32 for the fp32 parts on Ampere+; bf16 autocast does the rest
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and info.device.type == "cuda")

    dataset = build_dataset(args)
    vae = build_vae(args, info.device)
    torch.manual_seed(args.global_seed)  # the same initial weights on every rank and in every run with this seed
    model = build_model(args).to(info.device)
    objective = build_objective(args.objective)
    args.sampler = args.sampler or objective.default_sampler
    ema = EMA(model, args.ema_decay, args.ema_warmup)
    posthoc = PowerEMA(model, args.posthoc_ema_sigma_rels) if args.posthoc_ema else None
    run_dir = resume.run_directory(args)
    steps = total_steps(args, len(dataset))
    log = RunLogger(run_dir, info.is_main, steps, progress=not args.no_progress)

    # Check a checkpoint's settings before wrapping; load it after, into the unwrapped (or FSDP-sharded) modules.
    found = resume.find_resume_checkpoint(args, os.path.join(run_dir, "checkpoints"), log.info)
    if found is not None and found[1].get("format") == resume.FORMAT:
        resume.check_compatible(found[1]["args"], vars(args), found[0])
    wrapped = wrap_model(model, [ema.module, *(posthoc.modules if posthoc else [])], args, info.world_size,
                         info.device)
    opt = build_training_optimizer(model, args, info.device)
    run = Run(args, info, run_dir, log, dataset, vae, objective, model, wrapped, ema, opt,
              torch.bfloat16 if use_bf16 else None, micro_batch, steps, posthoc=posthoc)
    if found is not None:
        resume.restore(found[1], model, ema, opt, run.state, args, log.info, posthoc)
        log.info(f"resumed from {found[0]} at step {run.state.step} (epoch {run.state.epoch}, "
                 f"batch {run.state.batch_in_epoch})")
    elif args.resume == "auto":
        log.info(f"--resume auto: no checkpoint in {run.ckpt_dir}, starting fresh")
    log.resume_at(run.state.step)
    if info.is_main:
        resume.write_run_record(run_dir, args, info.world_size)
        log.attach(open_trackers(args, run_dir, run.state))
    run.sampler, run.loader = data_loader(run)
    describe(run)
    run.evaluator = build_evaluator(args, objective, info.device, vae, run.amp_dtype, log.info)
    return run


def data_loader(run: Run) -> tuple[GlobalBatchSampler, DataLoader]:
    """The batch sampler (restarting at the run's step) and a loader of this rank's micro-batches."""
    args = run.args
    sampler = GlobalBatchSampler(len(run.dataset), args.global_batch_size, run.info.rank, run.info.world_size,
                                 args.grad_accum, args.global_seed, start_step=run.state.step)
    # A private generator: creating the loader iterator must not consume the global RNG (exact resume).
    loader = DataLoader(run.dataset, batch_sampler=sampler, num_workers=args.num_workers,
                        pin_memory=run.device.type == "cuda", generator=torch.Generator(),
                        persistent_workers=args.num_workers > 0)
    return sampler, loader


def describe(run: Run) -> None:
    """The run's opening log lines: model size and cost, parallelism and precision, data, where output goes."""
    args, info, log = run.args, run.info, run.log
    n_params = sum(p.numel() for p in run.ema.module.parameters())
    gflops = model_macs(run.ema.module, args.input_size) / 1e9
    log.info(f"model {args.model} (C={args.hidden_size}, depth={args.depth}), {n_params / 1e6:.2f}M parameters, "
             f"{gflops:.3f} GFLOPs (GMACs) per forward at {args.input_size}px, {args.in_channels} channels")
    log.info(f"world size {info.world_size} on {run.device.type}, global batch {args.global_batch_size} = "
             f"{info.world_size} x {run.micro_batch} x {args.grad_accum} accumulation, precision "
             f"{'bf16' if run.amp_dtype else 'fp32'}, backend {args.backend}, objective {args.objective}, "
             f"{'FSDP2' if args.fsdp else 'DDP' if info.world_size > 1 else 'no wrapper'}"
             f"{', compiled' if args.compile else ''}")
    log.info(f"data: {run.dataset.describe()}"
             f"{' (encoded with the VAE)' if args.data_source == 'imagefolder_latent' else ''}; "
             f"{len(run.dataset) // args.global_batch_size} steps per epoch, training {run.total_steps} steps")
    log.info(f"run directory {run.run_dir}")


# ---- one training step ---------------------------------------------------------------------------------------------
def micro_step(run: Run, batch, gen: torch.Generator, last: bool) -> torch.Tensor:
    """Forward and backward of one micro-batch; returns its share of the step's mean loss (detached)."""
    args, device, rank = run.args, run.device, run.info.rank
    x, y = (t.to(device, non_blocking=True) for t in batch)
    if run.vae is not None and args.data_source == "imagefolder_latent":
        x = encode(run.vae, x, args.vae_scaling_factor)
    rows, mine = run.micro_batch * run.info.world_size, slice(rank * run.micro_batch, (rank + 1) * run.micro_batch)
    t = run.objective.sample_t(rows, device, generator=gen)[mine]
    noise = torch.randn((rows, *x.shape[1:]), generator=gen, device=device)[mine]
    # CFG label dropout, drawn on the global batch like t and noise (the model is built with label_dropout="external"):
    # the same labels are dropped whatever the world size.
    drop = torch.rand(rows, generator=gen, device=device)[mine]
    y = torch.where(drop < args.class_dropout_prob, torch.full_like(y, args.num_classes), y)
    if args.fsdp:  # FSDP2's no_sync: accumulate unsharded, reduce-scatter once after the last micro-batch
        run.model.set_requires_gradient_sync(last)
    no_sync = run.wrapped.no_sync() if (not last and hasattr(run.wrapped, "no_sync")) else contextlib.nullcontext()
    with no_sync:
        with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            loss = run.objective.training_losses(run.wrapped, x, t, model_kwargs=dict(y=y), noise=noise)["loss"]
        loss = loss.float().mean() / args.grad_accum
        loss.backward()
    return loss.detach()


def train_step(run: Run, batches, stop_requested: bool) -> tuple[float, float, float, bool]:
    """One optimiser step over --grad-accum micro-batches, skipped when not finite.

    Returns (loss, grad_norm, lr, stop), the same on every rank: stop is True when any rank was asked to stop."""
    args, state, device = run.args, run.state, run.device
    torch.manual_seed(step_seed(args.global_seed, state.step, run.info.rank))  # on-the-fly VAE posterior samples
    lr = lr_at(args, state.step)
    for group in run.opt.param_groups:
        group["lr"] = lr
    # Timesteps and noise for the whole global batch, identical on every rank; each rank takes its slice.
    gen = torch.Generator(device).manual_seed(step_seed(args.global_seed, state.step))
    loss_sum = torch.zeros((), device=device)
    for micro in range(args.grad_accum):
        loss_sum += micro_step(run, next(batches), gen, last=micro == args.grad_accum - 1)

    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.max_grad_norm or math.inf)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    # One all-reduce for the logged loss and the stop flag, so every rank decides alike; then a single
    # device-to-host copy for all three scalars (grad_norm is already identical on every rank).
    synced = distributed.all_reduce_mean(torch.stack([loss_sum, torch.tensor(float(stop_requested), device=device)]))
    loss, stop_flag, grad_value = torch.cat([synced, grad_norm.reshape(1).to(synced.dtype)]).tolist()
    if check_step(state, loss, grad_value, args.max_consecutive_skips):
        run.opt.step()
        run.ema.update(run.model, state.step)
    else:
        run.log.info(f"step {state.step}: non-finite loss {loss} / grad norm {grad_value}; skipped "
                     f"({state.skipped_steps} skipped in total)")
        run.log.metrics(state.step, {"skipped_steps": state.skipped_steps})
    if run.posthoc is not None:  # a skipped step leaves the weights as they were: the profile still counts it
        run.posthoc.update(run.model, state.step + 1)
    run.opt.zero_grad(set_to_none=True)
    return loss, grad_value, lr, stop_flag > 0


# ---- periodic actions ----------------------------------------------------------------------------------------------
def log_progress(run: Run, window: ProgressWindow, grad_norm: float, lr: float) -> None:
    """A log line and a metrics.jsonl row for the steps since the last one."""
    state = run.state
    metrics = {**window.summary(run.args.global_batch_size), "grad_norm": grad_norm, "lr": lr, "epoch": state.epoch,
               "skipped_steps": state.skipped_steps}
    if run.device.type == "cuda":
        metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    run.log.metrics(state.step, metrics)
    run.log.info(f"step {state.step:07d} loss {metrics['loss']:.4f} {metrics['steps_per_s']:.2f} steps/s "
                 f"{metrics['img_per_s']:.1f} img/s grad_norm {metrics['grad_norm']:.3g} lr {lr:.2e}"
                 + (f" peak_mem {metrics['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in metrics else ""))
    window.reset()


def save_checkpoint(run: Run, name: str | None = None) -> str:
    """Write checkpoints/<step>.pt, keeping the --keep-every milestones and the newest --keep-last others (or `name`,
    kept always). Every rank calls it."""
    payload = resume.training_payload(run.model, run.ema, run.opt, run.args, run.state, run.posthoc)
    path = os.path.join(run.ckpt_dir, name or resume.checkpoint_name(run.state.step))
    if run.info.is_main:
        resume.write_checkpoint(payload, path, keep_last=None if name else run.args.keep_last,
                                keep_every=run.args.keep_every)
        run.log.info(f"saved checkpoint {path}")
    distributed.barrier()
    return path


def reshard_ema(run: Run) -> None:
    # FSDP2 leaves a root module unsharded after a forward, expecting a backward to follow; the EMA has none, and
    # its next update would then meet full tensors where the model has shards.
    if run.args.fsdp:
        run.ema.module.reshard()


def write_sample_grid(run: Run) -> None:
    """samples/<step>.png: one row of EMA samples per preview class, from the same noise every time."""
    if run.info.is_main or run.args.fsdp:  # FSDP's sharded EMA needs every rank in the forward
        grid = sample_grid(run.ema.module, run.objective, run.args, run.device, run.vae, autocast_dtype=run.amp_dtype)
        reshard_ema(run)
        if run.info.is_main:
            path = os.path.join(run.run_dir, "samples", f"{run.state.step:07d}.png")
            save_png(grid, path)
            run.log.image(run.state.step, "samples", grid)
            run.log.info(f"wrote sample grid {path}")
    distributed.barrier()


def evaluate(run: Run) -> None:
    """Score the EMA with the evaluator, log the metrics, and save best.pt when the score is the best so far."""
    # An evaluator that splits its work over the processes runs on all of them; others run once, on rank 0
    # (all ranks under FSDP, whose sharded EMA needs every process in each forward).
    evaluator, state = run.evaluator, run.state
    every_rank = run.args.fsdp or getattr(evaluator, "runs_on_every_rank", False)
    metrics = evaluator(run.ema.module) if (run.info.is_main or every_rank) else {}
    reshard_ema(run)
    metrics = distributed.broadcast_object(metrics)
    run.log.info("eval: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    run.log.metrics(state.step, {f"eval/{k}": v for k, v in metrics.items()})
    value = metrics[evaluator.metric]
    sign = 1 if evaluator.lower_is_better else -1
    if state.best_metric is None or sign * value < sign * state.best_metric:
        state.best_metric, state.best_step = value, state.step
        save_checkpoint(run, "best.pt")


def finish(run: Run, session_start: float, session_step0: int) -> None:
    """After the last step: a final sample grid and evaluation, and where everything went."""
    write_sample_grid(run)
    if run.evaluator is not None and (run.args.final_eval or run.args.eval_every):
        evaluate(run)
    rate = (run.state.step - session_step0) / max(time.time() - session_start, 1e-9)
    run.log.info(f"done: {run.state.step} steps ({rate:.2f} steps/s this session). Checkpoints in {run.ckpt_dir}, "
                 f"samples in {os.path.join(run.run_dir, 'samples')}, metrics in "
                 f"{os.path.join(run.run_dir, 'metrics.jsonl')}")


def save_posthoc_snapshots(run: Run) -> None:
    """posthoc_ema/<step>-sigma<sigma_rel>.pt: one snapshot per tracked EMA profile (rank 0 writes; under FSDP every
    rank gathers the shards)."""
    if run.info.is_main or run.args.fsdp:
        dtype = torch.float16 if run.args.posthoc_ema_dtype == "fp16" else torch.float32
        paths = run.posthoc.save_snapshots(os.path.join(run.run_dir, SNAPSHOT_DIR), run.state.step,
                                           dict(vars(run.args)), dtype, resume.full_state_of(run.args),
                                           write=run.info.is_main)
        run.log.info(f"saved {len(paths)} post-hoc EMA snapshots at step {run.state.step}")


def due(step: int, every: int) -> bool:
    """True every `every` steps (never when `every` is 0)."""
    return bool(every) and step % every == 0


# ---- the loop ------------------------------------------------------------------------------------------------------
def train(args) -> TrainState:
    """Train as configured by fcdm.train.config.parse_args; returns the final TrainState."""
    run = setup(args)
    state, log = run.state, run.log
    batches, window = iter(run.loader), ProgressWindow()
    session_start, session_step0 = time.time(), state.step
    run.wrapped.train()
    with StopRequest() as stop:
        while state.step < run.total_steps:
            step_start = time.time()
            loss, grad_norm, lr, stop_now = train_step(run, batches, stop.requested)
            state.step += 1
            state.images_seen += args.global_batch_size
            state.epoch, state.batch_in_epoch = run.sampler.position(state.step)
            state.elapsed_s += time.time() - step_start
            window.add(loss)
            log.advance(1, {"loss": f"{loss:.4f}"})

            finished = state.step == run.total_steps
            if due(state.step, args.log_every) or finished:
                log_progress(run, window, grad_norm, lr)
            if stop_now or finished or due(state.step, args.ckpt_every):
                save_checkpoint(run)
            if due(state.step, args.sample_every) and not finished:
                write_sample_grid(run)
            if run.evaluator is not None and due(state.step, args.eval_every) and not finished:
                evaluate(run)
            if run.posthoc is not None and (due(state.step, args.posthoc_ema_every) or finished):
                save_posthoc_snapshots(run)
            if stop_now:
                log.info(f"stopping after step {state.step} on {stop.signal_name or 'a signal to another rank'}; "
                         f"resume with --resume auto")
                requeue_on_slurm(stop.signal_name, args.slurm_requeue and run.info.is_main, log.info)
                break
    if state.step == run.total_steps:
        finish(run, session_start, session_step0)
    log.close()
    return state
