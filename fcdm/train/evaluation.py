"""Pluggable evaluation for --eval-every / the demo's final check: a callable `evaluator(ema_model) -> metrics`
with a `metric` name and `lower_is_better`, used to keep best.pt.

- Procedural data (default): fcdm.demo_quality (class accuracy and a classifier-feature Frechet distance).
- --fid-ref PATH.npz: Inception FID of --eval-samples EMA samples against an ADM reference batch (fcdm.eval).
"""
from __future__ import annotations

import torch

from .samples import decode, to_uint8_nhwc


class InceptionFID:
    """FID of EMA samples against the pool statistics of an ADM reference .npz (arr_0 images or mu/sigma):
    fcdm.eval's InTrainingFID, fed by a sampler of the EMA model."""

    metric = "fid"
    lower_is_better = True

    def __init__(self, args, objective, device, vae, autocast_dtype, batch_size: int = 64):
        from fcdm.eval.features import InceptionFeatureExtractor
        from fcdm.eval.fid_hook import InTrainingFID

        self.args, self.objective, self.device, self.vae, self.amp = args, objective, device, vae, autocast_dtype
        self.fid = InTrainingFID(args.fid_ref, num_images=args.eval_samples, batch_size=batch_size, fid_method="eigh",
                                 extractor=InceptionFeatureExtractor(device=device), name="--fid-ref")
        self.fid.reference  # read (or compute) the reference statistics now: a bad file fails at start-up

    @torch.no_grad()
    def __call__(self, model) -> dict:
        from fcdm.sampling import generate
        a = self.args
        gen = torch.Generator(self.device).manual_seed(a.global_seed + 54321)
        labels = iter((torch.arange(a.eval_samples, device=self.device) % a.num_classes).split(self.fid.batch_size))

        def generate_uint8(count: int) -> torch.Tensor:
            y = next(labels)  # InTrainingFID asks for the same chunk sizes as the split
            x = generate(model, self.objective, y, shape=(a.in_channels, a.input_size, a.input_size),
                         sampler=a.sampler, steps=a.num_sampling_steps, cfg_scale=a.cfg_scale, generator=gen,
                         autocast_dtype=self.amp)
            return to_uint8_nhwc(decode(x, self.vae, a.vae_scaling_factor)).cpu()

        return {"fid": float(self.fid(generate_uint8))}


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
