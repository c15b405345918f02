"""diffusers' schedulers on fcdm's DDPM objective: configured from fcdm's own betas, held to the in-house samplers.

The reference is fcdm.diffusion's DDIM (bit-identical to DiT's). diffusers' DDIM with the same timesteps ("leading"
spacing is DDIM's 0, s, 2s, ... striding, fcdm's "ddimN") must give the same trajectory: to fp64 rounding when its
alpha-bar table is fp64, and within fp32 rounding of the table diffusers builds itself.
"""
import sys

import numpy as np
import pytest
import torch

from fcdm.objectives import build_objective
from fcdm.sampling import generate
from fcdm.schedulers import SCHEDULERS, build_scheduler, scheduler_sample

from .test_load import random_fcdm


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


class AnalyticDenoiser:
    """A smooth, t-dependent stand-in for a learned-sigma model: eps and variance channels from x, t and y."""

    def __init__(self, channels=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(2 * channels, channels, generator=g, dtype=torch.float64) / channels
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append(t.clone())
        scale = (1 + t.double() / 1000).view(-1, 1, 1, 1)
        out = torch.tanh(torch.einsum("oc,nchw->nohw", self.w.to(x.dtype), x) * scale.to(x.dtype))
        return out + 0.01 * y.view(-1, 1, 1, 1).to(x.dtype)


def fp64_tables(scheduler):
    ab = np.cumprod(1.0 - np.asarray(scheduler.config.trained_betas, dtype=np.float64))
    scheduler.alphas_cumprod = torch.from_numpy(ab)
    return scheduler


@pytest.mark.parametrize("steps", [2, 10, 50])
def test_diffusers_ddim_agrees_with_the_in_house_ddim(steps):
    objective = build_objective("ddpm")
    noise = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    ours_fn, theirs_fn = AnalyticDenoiser(), AnalyticDenoiser()
    ours, nfe = objective.sample(ours_fn, noise, y, "ddim", steps, respacing=f"ddim{steps}")
    scheduler = fp64_tables(build_scheduler("ddim", objective, timestep_spacing="leading", steps_offset=0))
    theirs, their_nfe = scheduler_sample(theirs_fn, scheduler, noise, y, steps)
    assert ours.dtype == theirs.dtype == torch.float64 and nfe == their_nfe == steps
    assert [int(t[0]) for t in ours_fn.calls] == [int(t[0]) for t in theirs_fn.calls]  # the model sees the same t
    assert rel(theirs, ours) < 1e-12, rel(theirs, ours)
    # diffusers' own fp32 table (from the same fp64 betas): fp32 rounding, no more.
    fp32 = build_scheduler("ddim", objective, timestep_spacing="leading", steps_offset=0)
    assert rel(scheduler_sample(AnalyticDenoiser(), fp32, noise.float(), y, steps)[0], ours) < 1e-5


def test_the_scheduler_gets_fcdms_betas_and_prediction_type():
    objective = build_objective("ddpm")
    for name in SCHEDULERS:
        s = build_scheduler(name, objective)
        assert np.array_equal(np.asarray(s.config.trained_betas), objective.diffusion.betas), name
        assert s.config.prediction_type == "epsilon" and s.config.num_train_timesteps == 1000
    assert build_scheduler("unipc", build_objective("ddpm", predict_xstart=True)).config.prediction_type == "sample"
    with pytest.raises(ValueError, match="scheduler must be one of"):
        build_scheduler("plms", objective)
    with pytest.raises(ValueError, match="ddpm objective"):
        build_scheduler("ddim", build_objective("flow"))


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_drives_a_learned_sigma_fcdm_with_guidance(name):
    torch.manual_seed(0)
    model = random_fcdm(num_classes=3, in_channels=4)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    stats = {}
    x = generate(model, "ddpm", torch.tensor([0, 2]), (4, 8, 8), steps=4, cfg_scale=2.0, scheduler=name,
                 generator=gens, stats=stats)
    assert x.shape == (2, 4, 8, 8) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert stats["nfe"] == (7 if name == "heun" else 4) and stats["uncond_rows"] == 2 * stats["nfe"]
    again = generate(model, "ddpm", torch.tensor([0, 2]), (4, 8, 8), steps=4, cfg_scale=2.0, scheduler=name,
                     generator=[torch.Generator().manual_seed(i) for i in range(2)])
    assert torch.equal(x, again)


def test_the_ddpm_scheduler_reads_the_variance_channels():
    # diffusers' DDPM with learned_range uses the model's v; changing only v must change the sample.
    objective = build_objective("ddpm")
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1])

    def run(v):
        def den(x, t, y):
            return torch.cat([0.1 * x, torch.full_like(x, v)], 1)
        return scheduler_sample(den, build_scheduler("ddpm", objective), noise, y, 5,
                                generator=torch.Generator().manual_seed(1))[0]
    assert not torch.allclose(run(-1.0), run(1.0))


def test_scheduler_and_sampler_options_are_exclusive():
    model = random_fcdm(num_classes=3, in_channels=4)
    with pytest.raises(ValueError, match="scheduler replaces sampler"):
        generate(model, "ddpm", torch.tensor([0]), (4, 8, 8), steps=2, scheduler="ddim", eta=0.5)


def test_a_missing_diffusers_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'fcdm\[vae\]'"):
        build_scheduler("dpmsolver++", build_objective("ddpm"))
