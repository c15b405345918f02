"""Pluggable evaluation for --eval-every / the demo's final check: a callable `evaluator(ema_model) -> metrics`
with a `metric` name and `lower_is_better`, used to keep best.pt.

- Procedural data (default): fcdm.demo_quality (class accuracy and a classifier-feature Frechet distance).
- --fid-ref PATH.npz: Inception FID of --eval-samples EMA samples against an ADM reference batch (fcdm.eval).
"""
from __future__ import annotations

import numpy as np
import torch

from .samples import decode


class InceptionFID:
    """FID of EMA samples against the pool statistics of an ADM reference .npz (arr_0 images or mu/sigma)."""

    metric = "fid"
    lower_is_better = True

    def __init__(self, args, objective, device, vae, autocast_dtype):
        try:
            from fcdm.eval.features import InceptionFeatureExtractor
            from fcdm.eval.metrics import feature_statistics
            from fcdm.eval.npz import NpzImages, read_statistics
        except ImportError as e:
            raise ValueError(f"--fid-ref needs the fcdm.eval package ({e})") from e
        self.args, self.objective, self.device, self.vae, self.amp = args, objective, device, vae, autocast_dtype
        self.extractor = InceptionFeatureExtractor(device=device)
        self._stats = feature_statistics
        ref = read_statistics(args.fid_ref, "--fid-ref")["pool"]
        if ref is None:
            acts = self.extractor.activations(NpzImages(args.fid_ref, "--fid-ref").batches(100))
            ref = feature_statistics(acts.pool)
        self.ref = ref

    @torch.no_grad()
    def __call__(self, model) -> dict:
        from fcdm.sampling import generate
        a, pools = self.args, []
        gen = torch.Generator(self.device).manual_seed(a.global_seed + 54321)
        for start in range(0, a.eval_samples, 64):
            y = torch.arange(start, min(start + 64, a.eval_samples), device=self.device) % a.num_classes
            x = generate(model, self.objective, y, shape=(a.in_channels, a.input_size, a.input_size),
                         sampler=a.sampler, steps=a.num_sampling_steps, cfg_scale=a.cfg_scale, generator=gen,
                         autocast_dtype=self.amp)
            images = ((decode(x, self.vae, a.vae_scaling_factor) + 1) * 127.5).round().clamp(0, 255)
            pools.append(self.extractor(images.to(torch.uint8).permute(0, 2, 3, 1).cpu())[0].cpu().numpy())
        stats = self._stats(np.concatenate(pools))
        return {"fid": float(stats.frechet_distance(self.ref, method="eigh"))}


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
    from fcdm.demo_quality import DemoQuality
    return DemoQuality(args.input_size, objective, args.sampler, args.num_sampling_steps, args.cfg_scale,
                       num_samples=args.eval_samples, seed=args.global_seed, device=device,
                       autocast_dtype=autocast_dtype, log=log)
