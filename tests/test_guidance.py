"""Classifier-free guidance: the formula and channels, parity with FCDM.forward_with_cfg, and real interval skipping."""
import pytest
import torch

import fcdm
from fcdm.guidance import GuidedDenoiser
from fcdm.objectives import build_objective
from fcdm.sampling import generate


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see conftest


class RecordingModel(torch.nn.Module):
    """Label- and time-dependent output with 2C channels; records every call's batch size, labels and t."""

    def __init__(self, channels: int = 4, num_classes: int = 10):
        super().__init__()
        self.num_classes, self.channels = num_classes, channels
        self.weight = torch.nn.Parameter(torch.randn(2 * channels, channels) * 0.3)
        self.label = torch.nn.Parameter(torch.randn(num_classes + 1, 2 * channels) * 0.3)
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], y.clone(), t.clone()))
        h = torch.einsum("oc,nchw->nohw", self.weight, x)
        return torch.tanh(h + self.label[y][:, :, None, None] + 0.001 * t.float().view(-1, 1, 1, 1))


def test_guidance_formula_and_channels():
    model = RecordingModel()
    x, t, y = torch.randn(3, 4, 2, 2), torch.tensor([5, 500, 900]), torch.tensor([1, 7, 3])
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
    for all_channels, k in ((False, 3), (True, 4)):
        out = GuidedDenoiser(model, 2.5, guide_all_channels=all_channels)(x, t, y)
        assert torch.allclose(out[:, :k], uncond[:, :k] + 2.5 * (cond[:, :k] - uncond[:, :k]), atol=1e-6)
        # Unguided and variance channels come from the conditional pass.
        assert torch.allclose(out[:, k:], cond[:, k:], atol=1e-6)
        assert not torch.allclose(out[:, :k], cond[:, :k])
    batch, labels, _ = model.calls[-1]
    assert batch == 6 and torch.equal(labels, torch.tensor([1, 7, 3, 10, 10, 10])), "null label = num_classes"


@pytest.mark.parametrize("guide_all_channels", [False, True])
def test_matches_fcdm_forward_with_cfg(guide_all_channels):
    torch.manual_seed(0)
    model = fcdm.FCDM(hidden_size=8, depth=(1, 1, 1, 1, 1), num_classes=10).eval()
    for p in model.parameters():  # adaLN-zero starts as a zero predictor; make the comparison meaningful
        p.data.normal_(0, 0.2)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([17, 640]), torch.tensor([3, 9])
    with torch.no_grad():
        official = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]),
                                          4.0, guide_all_channels=guide_all_channels)[:2]
        ours = GuidedDenoiser(model, 4.0, guide_all_channels=guide_all_channels)(x, t, y)
    assert torch.equal(ours, official)


def test_scale_one_is_conditional_sampling_without_unconditional_passes():
    model = RecordingModel()
    obj = build_objective("ddpm")
    y = torch.tensor([2, 4, 6])
    noise = torch.randn(3, 4, 4, 4)
    stats = {}
    guided = generate(model, obj, y, (4, 4, 4), sampler="ddpm", steps=12, cfg_scale=1.0, noise=noise,
                      generator=torch.Generator().manual_seed(7), stats=stats)
    assert all(b == 3 and (labels != 10).all() for b, labels, _ in model.calls)
    diffusion = obj.sampling_diffusion(12)
    plain = diffusion.p_sample_loop(model, noise.shape, noise, clip_denoised=False, model_kwargs=dict(y=y),
                                    generator=torch.Generator().manual_seed(7))
    assert torch.equal(guided, plain)
    assert stats["uncond_rows"] == 0 and stats["forward_passes"] == 12 == stats["nfe"]
    stronger = generate(model, obj, y, (4, 4, 4), sampler="ddpm", steps=12, cfg_scale=3.0, noise=noise,
                        generator=torch.Generator().manual_seed(7))
    assert not torch.allclose(stronger, plain)


@pytest.mark.parametrize("objective,sampler", [("ddpm", "ddpm"), ("ddpm", "ddim"), ("flow", "euler"),
                                               ("flow", "heun"), ("flow", "sde")])
def test_interval_really_skips_unconditional_passes(objective, sampler):
    model = RecordingModel()
    obj = build_objective(objective)
    y = torch.tensor([1, 2, 3, 4])
    low, high = 0.2, 0.6
    stats = {}
    generate(model, obj, y, (4, 2, 2), sampler=sampler, steps=20, cfg_scale=3.0, guidance_interval=(low, high),
             stats=stats, generator=torch.Generator().manual_seed(0))
    inside = outside = 0
    for batch, labels, t in model.calls:
        level = t[0].item() / 1000 if objective == "ddpm" else 1 - t[0].item()  # noise level: 0 data, 1 noise
        if low <= level <= high:
            inside += 1
            assert batch == 8 and (labels[4:] == 10).all()
        else:
            outside += 1
            assert batch == 4 and (labels != 10).all(), "outside the interval no unconditional row may run"
    assert inside > 0 and outside > 0
    assert stats["forward_passes"] == len(model.calls) == inside + outside
    assert stats["uncond_rows"] == 4 * inside and stats["uncond_skipped"] == 4 * outside
    assert stats["nfe"] == (40 if sampler == "heun" else 20)


def test_interval_guides_only_the_rows_inside():
    model = RecordingModel()
    level = lambda t: t.float() / 1000  # noqa: E731
    x, t, y = torch.randn(3, 4, 2, 2), torch.tensor([100, 500, 900]), torch.tensor([0, 1, 2])
    out = GuidedDenoiser(model, 2.0, interval=(0.3, 0.7), noise_level=level)(x, t, y)
    batch, labels, _ = model.calls[-1]
    assert batch == 4 and labels[3] == 10
    full = GuidedDenoiser(model, 2.0)(x, t, y)
    cond = model(x, t, y)
    assert torch.allclose(out[1], full[1], atol=1e-6) and torch.allclose(out[[0, 2]], cond[[0, 2]], atol=1e-6)
    assert not torch.allclose(out[0], full[0], atol=1e-3)


def test_bad_arguments():
    model = RecordingModel()
    with pytest.raises(ValueError, match="cfg_scale"):
        GuidedDenoiser(model, -1.0)
    with pytest.raises(ValueError, match="guidance_interval"):
        GuidedDenoiser(model, 2.0, interval=(0.8, 0.2), noise_level=lambda t: t)
    with pytest.raises(ValueError, match="noise_level"):
        GuidedDenoiser(model, 2.0, interval=(0.1, 0.2))
    with pytest.raises(ValueError, match="null_label"):
        GuidedDenoiser(lambda x, t, y: x, 2.0)
    with pytest.raises(ValueError, match="sampler"):
        generate(model, build_objective("ddpm"), torch.tensor([1]), (4, 2, 2), sampler="heun", steps=3)
    with pytest.raises(ValueError, match="sampler"):
        generate(model, build_objective("flow"), torch.tensor([1]), (4, 2, 2), sampler="ddim", steps=3)
    with pytest.raises(ValueError, match="eta"):
        generate(model, build_objective("flow"), torch.tensor([1]), (4, 2, 2), sampler="heun", steps=3, eta=0.5)


def test_generate_restores_train_mode_and_is_seeded():
    model = RecordingModel().train()
    y = torch.tensor([0, 1])
    a = generate(model, "flow", y, (4, 2, 2), sampler="sde", steps=5, generator=torch.Generator().manual_seed(3))
    b = generate(model, "flow", y, (4, 2, 2), sampler="sde", steps=5, generator=torch.Generator().manual_seed(3))
    assert model.training and torch.equal(a, b) and a.dtype == torch.float32


def test_bf16_autocast_keeps_the_sampler_maths_in_fp32():
    torch.manual_seed(0)
    model = fcdm.FCDM(hidden_size=8, depth=(1, 1, 1, 1, 1), num_classes=10)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    y, noise = torch.tensor([1, 5]), torch.randn(2, 4, 8, 8)
    fp32 = generate(model, "flow", y, (4, 8, 8), sampler="heun", steps=4, cfg_scale=1.5, noise=noise)
    bf16 = generate(model, "flow", y, (4, 8, 8), sampler="heun", steps=4, cfg_scale=1.5, noise=noise,
                    autocast_dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    err = ((bf16 - fp32).norm() / fp32.norm()).item()
    assert 0 < err < 2e-2, err  # bf16 really ran (err > 0) and stayed close
