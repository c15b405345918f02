"""Pluggable evaluation for --eval-every / the demo's final check: a callable `evaluator(ema_model) -> metrics`
with a `metric` name and `lower_is_better`, used to keep best.pt.

- Procedural data (default): fcdm.eval.demo_quality (class accuracy and a classifier-feature Frechet distance).
- --fid-ref PATH.npz: Inception FID of --eval-samples EMA samples against an ADM reference batch (fcdm.eval).
"""
from __future__ import annotations

import numpy as np
import torch

from fcdm import distributed
from fcdm.eval import features as inception
from fcdm.eval.demo_quality import DemoQuality
from fcdm.eval.fid_hook import InTrainingFID
from fcdm.sampling import generate
from fcdm.vae import to_uint8

from .previews import viewable


class InceptionFID:
    """FID of EMA samples against the pool statistics of an ADM reference .npz (arr_0 images or mu/sigma):
    fcdm.eval's InTrainingFID, fed by a sampler of the EMA model.

    Called on every process. Without FSDP each process generates every world_size-th chunk of images and the pool
    features are gathered, so an evaluation takes 1/world_size of the time and no process idles in a collective.
    Under FSDP the sharded EMA needs every process in every forward, so all of them generate all chunks. Chunk k's
    labels and noise come from k alone, so the score does not depend on the number of processes."""

    metric = "fid"
    lower_is_better = True
    runs_on_every_rank = True

    def __init__(self, args, objective, device, vae, autocast_dtype, batch_size: int = 64):
        self.args, self.objective, self.device, self.vae, self.amp = args, objective, device, vae, autocast_dtype
        self.fid = InTrainingFID(args.fid_ref, num_images=args.eval_samples, batch_size=batch_size, fid_method="eigh",
                                 extractor=inception.InceptionFeatureExtractor(device=device), name="--fid-ref")
        self.fid.reference  # read (or compute) the reference statistics now: a bad file fails at start-up

    @torch.no_grad()
    def __call__(self, model) -> dict:
        a = self.args
        info = distributed.info()
        chunks = self.fid.chunks()
        split = info.world_size > 1 and not a.fsdp
        mine = chunks[info.rank::info.world_size] if split else chunks

        def generate_uint8(start: int, count: int) -> torch.Tensor:
            y = torch.arange(start, start + count, device=self.device) % a.num_classes
            gen = torch.Generator(self.device).manual_seed(a.global_seed + 54321 + start)
            x = generate(model, self.objective, y, shape=(a.in_channels, a.input_size, a.input_size),
                         sampler=a.sampler, steps=a.num_sampling_steps, cfg_scale=a.cfg_scale, generator=gen,
                         autocast_dtype=self.amp)
            return to_uint8(viewable(x, self.vae, a.vae_scaling_factor)).cpu()

        features = self.fid.chunk_features(mine, generate_uint8)
        if split:  # back into chunk order: rank r holds chunks r, r + W, r + 2W, ...
            parts = distributed.all_gather_object(features)
            sizes = [[count for _, count in chunks[r::info.world_size]] for r in range(info.world_size)]
            pieces = [np.split(part, np.cumsum(size)[:-1]) if size else [] for part, size in zip(parts, sizes)]
            features = np.concatenate([pieces[k % info.world_size][k // info.world_size] for k in range(len(chunks))])
        return {"fid": float(self.fid.distance(features))}


def build_evaluator(args, objective, device, vae, autocast_dtype, log=print):
    """The evaluator the flags ask for, or None when no evaluation is requested."""
    wanted = args.eval_every or args.final_eval or args.fid_ref
    if not wanted:
        return None
    if args.fid_ref:
        return InceptionFID(args, objective, device, vae, autocast_dtype)
    if args.data_source != "procedural":
        if args.eval_every:
            raise ValueError("--eval-every on real data needs --fid-ref PATH.npz (an ADM reference batch)")
        return None
    return DemoQuality(args.input_size, objective, args.sampler, args.num_sampling_steps, args.cfg_scale,
                       num_samples=args.eval_samples, seed=args.global_seed, device=device,
                       autocast_dtype=autocast_dtype, log=log)
