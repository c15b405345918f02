"""The training loop. Read top to bottom: setup, resume, then one optimiser step per iteration.

Each step's randomness (timesteps, noise, label dropout) is seeded from (seed, step), so a resumed run repeats
exactly what an uninterrupted run would have done; timesteps and noise are drawn for the whole global batch and
sliced per rank, so the run does not depend on how the batch is split across processes.
"""
from __future__ import annotations

import contextlib
import math
import os
import time

import torch
from torch.utils.data import DataLoader

import fcdm
from fcdm import distributed
from fcdm.data import GlobalBatchSampler
from fcdm.models.flops import model_macs
from fcdm.objectives import build_objective
from fcdm.vae import encode

from . import checkpoint as ckpt_io
from .builders import build_dataset, build_model, build_vae
from .ema import EMA
from .evaluation import build_evaluator
from .guards import check_step
from .logging import RunLogger
from .samples import sample_grid, save_png
from .signals import StopRequest
from .state import TrainState, capture_rng, restore_rng, step_seed


def run_directory(args, info) -> str:
    """<results-dir>/<run>: the run being resumed, --run-name, or the next free NNN-<model> (official naming)."""
    if info.is_main:
        run_dir = None
        resume_path = args.resume if args.resume not in (None, "auto") else args.ckpt
        if resume_path and os.path.basename(os.path.dirname(os.path.abspath(resume_path))) == "checkpoints":
            run_dir = os.path.dirname(os.path.dirname(os.path.abspath(resume_path)))
        elif args.run_name:
            run_dir = os.path.join(args.results_dir, args.run_name)
        elif args.resume == "auto":  # the newest existing run of this model with a checkpoint
            suffix = "-" + args.model
            runs = sorted(d for d in (os.listdir(args.results_dir) if os.path.isdir(args.results_dir) else [])
                          if d[:3].isdigit() and d[3:].startswith(suffix))
            for name in reversed(runs):
                if ckpt_io.list_checkpoints(os.path.join(args.results_dir, name, "checkpoints")):
                    run_dir = os.path.join(args.results_dir, name)
                    break
        if run_dir is None:
            os.makedirs(args.results_dir, exist_ok=True)
            index = len(os.listdir(args.results_dir))
            run_dir = os.path.join(args.results_dir, f"{index:03d}-{args.model}" +
                                   (f"-{args.vae_name}" if args.vae_name else ""))
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
    return distributed.broadcast_object(run_dir if info.is_main else None)


def find_resume_checkpoint(args, ckpt_dir: str, log) -> tuple[str, dict] | None:
    """(path, contents) of the checkpoint to start from, or None. Rank 0 chooses, so all ranks load the same file."""
    path = args.resume or args.ckpt
    if args.resume == "auto":
        found = ckpt_io.find_latest_valid(ckpt_dir, log) if distributed.info().is_main else None
        path = distributed.broadcast_object(found[0] if found else None)
        if found is not None:
            return found  # rank 0 has it loaded already
    return (path, ckpt_io.load(path)) if path else None


def lr_at(args, step: int) -> float:
    """Linear warmup over --warmup-steps, then constant (the paper uses a constant 1e-4)."""
    return args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr


def wrap(model, ema, args, info):
    """DDP, FSDP2 or nothing (a single process needs no wrapper), then optionally torch.compile."""
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard
        for module in (model, ema.module):
            for block in module.all_blocks():
                fully_shard(block)
            fully_shard(module)
        train_model = model
    elif info.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=device_ids)
    else:
        train_model = model
    return torch.compile(train_model) if args.compile else train_model


def training_payload(model, ema, opt, args, state, fsdp: bool) -> dict:
    """The checkpoint dict (collective under FSDP or DDP; meaningful on rank 0)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, ema_sd = get_model_state_dict(model, options=full), get_model_state_dict(ema.module, options=full)
        opt_sd = get_optimizer_state_dict(model, opt, options=full)
    else:
        model_sd, ema_sd, opt_sd = model.state_dict(), ema.module.state_dict(), opt.state_dict()
    rng = distributed.all_gather_object(capture_rng())
    return {"model": model_sd, "ema": ema_sd, "opt": opt_sd, "args": dict(vars(args)),
            "train_state": state.to_dict(), "rng": rng, "world_size": distributed.info().world_size,
            "format": ckpt_io.FORMAT}


def restore(ckpt: dict, model, ema, opt, state: TrainState, args, info, log) -> None:
    """Load a checkpoint into the (unwrapped, or FSDP-sharded) model, EMA, optimiser, state and RNGs."""
    if args.fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, ckpt["model"], options=full)
        set_model_state_dict(ema.module, ckpt.get("ema", ckpt["model"]), options=full)
        if "opt" in ckpt:
            set_optimizer_state_dict(model, opt, ckpt["opt"], options=full)
    else:
        try:
            model.load_state_dict(ckpt["model"])
            ema.module.load_state_dict(ckpt.get("ema", ckpt["model"]))
        except RuntimeError as e:  # missing keys or shape mismatches: a checkpoint of another architecture
            raise ValueError(f"the checkpoint does not fit this model (check --model, --hidden-size, --depth, "
                             f"--num-classes, --objective): {e}") from e
        if "opt" in ckpt:
            opt.load_state_dict(ckpt["opt"])
    if ckpt.get("format") != ckpt_io.FORMAT:
        log("loaded weights and optimiser from an official checkpoint; step and data position start at 0")
        return
    restored = TrainState.from_dict(ckpt["train_state"])
    state.__dict__.update(restored.__dict__)
    rng = ckpt.get("rng", [])
    if ckpt.get("world_size") == info.world_size and info.rank < len(rng):
        restore_rng(rng[info.rank])
    else:
        log(f"world size changed ({ckpt.get('world_size')} -> {info.world_size}): per-rank RNG states not "
            f"restored; data order and per-step noise are unaffected")


def train(args) -> TrainState:
    """Train as configured by fcdm.train.config.parse_args; returns the final TrainState."""
    info = distributed.init(args.device, require_group=args.fsdp, timeout_minutes=args.dist_timeout_minutes)
    if args.global_batch_size % (info.world_size * args.grad_accum):
        raise ValueError(f"--global-batch-size {args.global_batch_size} does not split evenly over {info.world_size} "
                         f"processes x --grad-accum {args.grad_accum}; use a multiple of "
                         f"{info.world_size * args.grad_accum}")
    micro_batch = args.global_batch_size // (info.world_size * args.grad_accum)
    if args.backend is not None:
        fcdm.set_backend(args.backend)
    args.backend = fcdm.get_backend()  # what runs (and what the checkpoint records): flag, FCDM_BACKEND or auto
    device = info.device
    if device.type == "cuda":  # TF32 for the fp32 parts on Ampere+; bf16 autocast does the rest
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp_dtype = torch.bfloat16 if args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda") \
        else None

    # --- data, model, objective --------------------------------------------------------------------------------
    dataset = build_dataset(args)
    vae = build_vae(args, device)
    torch.manual_seed(args.global_seed)  # the same initial weights on every rank and in every run with this seed
    model = build_model(args).to(device)
    objective = build_objective(args.objective)
    args.sampler = args.sampler or objective.default_sampler
    ema = EMA(model, args.ema_decay, args.ema_warmup)
    run_dir = run_directory(args, info)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    steps_per_epoch = len(dataset) // args.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the dataset has {len(dataset)} items, fewer than one global batch of "
                         f"{args.global_batch_size}")
    total_steps = min(args.max_train_steps, args.epochs * steps_per_epoch)
    log = RunLogger(run_dir, info.is_main, total_steps, progress=not args.no_progress)

    # --- resume: check the settings first, then load into the unwrapped (or FSDP-sharded) modules ---------------
    state = TrainState()
    found = find_resume_checkpoint(args, ckpt_dir, log.info)
    if found is not None and found[1].get("format") == ckpt_io.FORMAT:
        ckpt_io.check_compatible(found[1]["args"], vars(args), found[0])
    wrapped = wrap(model, ema, args, info)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if found is not None:
        restore(found[1], model, ema, opt, state, args, info, log.info)
        log.info(f"resumed from {found[0]} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
    elif args.resume == "auto":
        log.info(f"--resume auto: no checkpoint in {ckpt_dir}, starting fresh")
    del found
    if log.bar is not None:
        log.bar.n = state.step

    sampler = GlobalBatchSampler(len(dataset), args.global_batch_size, info.rank, info.world_size, args.grad_accum,
                                 args.global_seed, start_step=state.step)
    # A private generator: creating the loader iterator must not consume the global RNG (exact resume).
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator(),
                        persistent_workers=args.num_workers > 0)
    n_params = sum(p.numel() for p in ema.module.parameters())
    gflops = model_macs(ema.module, args.input_size) / 1e9
    log.info(f"model {args.model} (C={args.hidden_size}, depth={args.depth}), {n_params / 1e6:.2f}M parameters, "
             f"{gflops:.3f} GFLOPs (GMACs) per forward at {args.input_size}px, {args.in_channels} channels")
    log.info(f"world size {info.world_size} on {device.type}, global batch {args.global_batch_size} = "
             f"{info.world_size} x {micro_batch} x {args.grad_accum} accumulation, precision "
             f"{'bf16' if amp_dtype else 'fp32'}, backend {args.backend}, objective {args.objective}, "
             f"{'FSDP2' if args.fsdp else 'DDP' if info.world_size > 1 else 'no wrapper'}"
             f"{', compiled' if args.compile else ''}")
    log.info(f"data: {dataset.describe()}{' (encoded with the VAE)' if args.data_source == 'imagefolder_latent' else ''}"
             f"; {steps_per_epoch} steps per epoch, training {total_steps} steps")
    log.info(f"run directory {run_dir}")
    evaluator = build_evaluator(args, objective, device, vae, amp_dtype, log.info)

    def save(name: str | None = None) -> str | None:
        payload = training_payload(model, ema, opt, args, state, args.fsdp)
        path = os.path.join(ckpt_dir, name or ckpt_io.checkpoint_name(state.step))
        if info.is_main:
            if not (ckpt_io.all_finite(payload["model"]) and ckpt_io.all_finite(payload["ema"])):
                raise RuntimeError(f"refusing to save non-finite weights at step {state.step}")
            ckpt_io.atomic_save(payload, path)
            if name is None:
                ckpt_io.prune(ckpt_dir, args.keep_last)
            log.info(f"saved checkpoint {path}")
        distributed.barrier()
        return path

    def reshard_ema() -> None:
        # FSDP2 leaves a root module unsharded after a forward, expecting a backward to follow; the EMA has none, and
        # its next update would then meet full tensors where the model has shards.
        if args.fsdp:
            ema.module.reshard()

    def write_samples() -> None:
        if info.is_main or args.fsdp:  # FSDP's sharded EMA needs every rank in the forward
            grid = sample_grid(ema.module, objective, args, device, vae, autocast_dtype=amp_dtype)
            reshard_ema()
            if info.is_main:
                path = os.path.join(run_dir, "samples", f"{state.step:07d}.png")
                save_png(grid, path)
                log.info(f"wrote sample grid {path}")
        distributed.barrier()

    def evaluate() -> None:
        # An evaluator that splits its work over the processes runs on all of them; others run once, on rank 0
        # (all ranks under FSDP, whose sharded EMA needs every process in each forward).
        every_rank = args.fsdp or getattr(evaluator, "runs_on_every_rank", False)
        metrics = evaluator(ema.module) if (info.is_main or every_rank) else {}
        reshard_ema()
        metrics = distributed.broadcast_object(metrics)
        log.info("eval: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        log.metrics(state.step, {f"eval/{k}": v for k, v in metrics.items()})
        value = metrics[evaluator.metric]
        sign = 1 if evaluator.lower_is_better else -1
        if state.best_metric is None or sign * value < sign * state.best_metric:
            state.best_metric, state.best_step = value, state.step
            save("best.pt")

    # --- the loop -----------------------------------------------------------------------------------------------
    wrapped.train()
    batches = iter(loader)
    window = {"loss": 0.0, "steps": 0, "start": time.time()}
    session_start, session_step0 = time.time(), state.step
    with StopRequest() as stop:
        while state.step < total_steps:
            step_start = time.time()
            torch.manual_seed(step_seed(args.global_seed, state.step, info.rank))  # on-the-fly VAE posterior samples
            lr = lr_at(args, state.step)
            for group in opt.param_groups:
                group["lr"] = lr
            # Timesteps and noise for the whole global batch, identical on every rank; each rank takes its slice.
            gen = torch.Generator(device).manual_seed(step_seed(args.global_seed, state.step))
            rank_slice = slice(info.rank * micro_batch, (info.rank + 1) * micro_batch)
            loss_sum = torch.zeros((), device=device)
            for micro in range(args.grad_accum):
                x, y = next(batches)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if vae is not None and args.data_source == "imagefolder_latent":
                    x = encode(vae, x, args.vae_scaling_factor)
                t = objective.sample_t(micro_batch * info.world_size, device, generator=gen)[rank_slice]
                noise = torch.randn((micro_batch * info.world_size, *x.shape[1:]), generator=gen,
                                    device=device)[rank_slice]
                # CFG label dropout, drawn on the global batch like t and noise (the model is built with
                # label_dropout="external"): the same labels are dropped whatever the world size.
                drop = torch.rand(micro_batch * info.world_size, generator=gen, device=device)[rank_slice]
                y = torch.where(drop < args.class_dropout_prob, torch.full_like(y, args.num_classes), y)
                last = micro == args.grad_accum - 1
                if args.fsdp:  # FSDP2's no_sync: accumulate unsharded, reduce-scatter once after the last micro-batch
                    model.set_requires_gradient_sync(last)
                no_sync = wrapped.no_sync() if (not last and hasattr(wrapped, "no_sync")) else contextlib.nullcontext()
                with no_sync:
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        loss = objective.training_losses(wrapped, x, t, model_kwargs=dict(y=y), noise=noise)["loss"]
                    loss = loss.float().mean() / args.grad_accum
                    loss.backward()
                loss_sum += loss.detach()

            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            # One all-reduce for the logged loss and the stop flag, so every rank decides alike; then a single
            # device-to-host copy for all three scalars (grad_norm is already identical on every rank).
            synced = distributed.all_reduce_mean(torch.stack([loss_sum, torch.tensor(
                float(stop.requested), device=device)]))
            loss_value, stop_flag, grad_value = torch.cat([synced, grad_norm.reshape(1).to(synced.dtype)]).tolist()
            stop_now = stop_flag > 0
            if check_step(state, loss_value, grad_value, args.max_consecutive_skips):
                opt.step()
                ema.update(model, state.step)
            else:
                log.info(f"step {state.step}: non-finite loss {loss_value} / grad norm {grad_value}; skipped "
                         f"({state.skipped_steps} skipped in total)")
                log.metrics(state.step, {"skipped_steps": state.skipped_steps})
            opt.zero_grad(set_to_none=True)

            state.step += 1
            state.images_seen += args.global_batch_size
            state.epoch, state.batch_in_epoch = sampler.position(state.step)
            state.elapsed_s += time.time() - step_start
            if math.isfinite(loss_value):
                window["loss"] += loss_value
                window["steps"] += 1
            log.advance(1, {"loss": f"{loss_value:.4f}"})

            if state.step % args.log_every == 0 or state.step == total_steps:
                seconds = time.time() - window["start"]
                steps = max(window["steps"], 1)
                metrics = {"loss": window["loss"] / steps, "steps_per_s": steps / seconds,
                           "img_per_s": steps * args.global_batch_size / seconds, "grad_norm": grad_value,
                           "lr": lr, "epoch": state.epoch, "skipped_steps": state.skipped_steps}
                if device.type == "cuda":
                    metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                log.metrics(state.step, metrics)
                log.info(f"step {state.step:07d} loss {metrics['loss']:.4f} {metrics['steps_per_s']:.2f} steps/s "
                         f"{metrics['img_per_s']:.1f} img/s grad_norm {metrics['grad_norm']:.3g} lr {lr:.2e}"
                         + (f" peak_mem {metrics['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in metrics else ""))
                window = {"loss": 0.0, "steps": 0, "start": time.time()}

            finished = state.step == total_steps
            if stop_now or finished or (args.ckpt_every and state.step % args.ckpt_every == 0):
                save()
            if args.sample_every and state.step % args.sample_every == 0 and not finished:
                write_samples()
            if evaluator is not None and args.eval_every and state.step % args.eval_every == 0 and not finished:
                evaluate()
            if stop_now:
                log.info(f"stopping after step {state.step} on {stop.signal_name or 'a signal to another rank'}; "
                         f"resume with --resume auto")
                break

    if state.step == total_steps:
        write_samples()
        if evaluator is not None and (args.final_eval or args.eval_every):
            evaluate()
        rate = (state.step - session_step0) / max(time.time() - session_start, 1e-9)
        log.info(f"done: {state.step} steps ({rate:.2f} steps/s this session). Checkpoints in {ckpt_dir}, samples in "
                 f"{os.path.join(run_dir, 'samples')}, metrics in {os.path.join(run_dir, 'metrics.jsonl')}")
    log.close()
    return state
