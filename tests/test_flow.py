"""Flow matching: path identities, the losses, time sampling, solver orders on an exact field, and a trained toy."""
import math

import pytest
import torch

from fcdm.flow import FlowMatching, LinearPath, ode_sample, sde_sample
from fcdm.objectives import build_objective
from fcdm.sampling import generate
from tests.numerics import assert_rel_close


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see conftest


def test_linear_path_conversions_fp64():
    path = LinearPath()
    noise, data = torch.randn(5, 3, 2, 2, dtype=torch.float64), torch.randn(5, 3, 2, 2, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64) * 0.98 + 0.01
    tc = t.view(-1, 1, 1, 1)
    x = path.interpolate(t, noise, data)
    assert_rel_close(x, tc * data + (1 - tc) * noise, 1e-14, "x_t")
    v = path.target_velocity(noise, data)
    score = -noise / (1 - tc)  # grad log N(x; t data, (1 - t)^2) given data
    assert_rel_close(path.score_from_velocity(v, x, t), score, 1e-12, "score from velocity")
    assert_rel_close(path.velocity_from_score(score, x, t), v, 1e-12, "velocity from score")
    assert_rel_close(path.velocity_from_noise(noise, x, t), v, 1e-12, "velocity from noise")


class FixedOutput(torch.nn.Module):
    """A fixed leaf output (optionally 2C channels) and a record of the inputs it saw."""

    def __init__(self, out):
        super().__init__()
        self.out = torch.nn.Parameter(out)

    def forward(self, x, t, y=None):
        self.x, self.t = x, t
        return self.out


@pytest.mark.parametrize("prediction", ["velocity", "noise", "score"])
def test_training_loss_closed_form(prediction):
    flow = FlowMatching(prediction=prediction)
    data, noise = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.randn(4, 2, 3, 3, dtype=torch.float64)
    t = torch.tensor([0.1, 0.35, 0.6, 0.97], dtype=torch.float64)
    model = FixedOutput(torch.randn(4, 4, 3, 3, dtype=torch.float64))  # learned-sigma width: 2C channels
    losses = flow.training_losses(model, data, t, noise=noise)
    tc = t.view(-1, 1, 1, 1)
    assert_rel_close(model.x, tc * data + (1 - tc) * noise, 1e-14, "model input x_t")
    assert torch.equal(model.t, t)
    pred = model.out.detach()[:, :2]
    target = {"velocity": data - noise, "noise": noise, "score": -noise / (1 - tc)}[prediction]
    scale = (1 - tc) if prediction == "score" else 1.0  # SiT scales the score error by sigma_t
    assert_rel_close(losses["loss"], ((scale * (pred - target)) ** 2).mean((1, 2, 3)), 1e-12, "loss")
    grad, = torch.autograd.grad(losses["loss"].sum(), model.out)
    assert grad[:, 2:].abs().max() == 0 and grad[:, :2].abs().max() > 0, "extra sigma channels must be ignored"


def test_time_sampling():
    uniform = FlowMatching()
    t = uniform.sample_t(20_000, "cpu")
    assert t.dtype == torch.float32 and t.min() >= 0 and t.max() <= 1 and abs(t.mean().item() - 0.5) < 0.01
    logit_normal = FlowMatching(t_sampling="logit_normal", logit_normal_mean=0.5, logit_normal_std=0.8)
    logit = torch.logit(logit_normal.sample_t(20_000, "cpu").double())
    assert abs(logit.mean().item() - 0.5) < 0.02 and abs(logit.std().item() - 0.8) < 0.02
    noise_pred = FlowMatching(prediction="noise").sample_t(20_000, "cpu")
    assert noise_pred.min() >= 1e-3 and noise_pred.max() <= 1 - 1e-3  # SiT keeps off the singular ends
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(uniform.sample_t(8, "cpu", g()), uniform.sample_t(8, "cpu", g()))
    for bad in (dict(prediction="x0"), dict(t_sampling="beta"), dict(path="gvp"), dict(logit_normal_std=0)):
        with pytest.raises(ValueError):
            FlowMatching(**bad)


def gaussian_velocity(mu, s2):
    """Exact marginal velocity of the linear path from N(0, 1) to N(mu, s2) (independent coupling)."""
    def velocity(x, t):
        tc = t.view(-1, 1, 1, 1).to(x.dtype)
        var_t = tc ** 2 * s2 + (1 - tc) ** 2
        return mu + (tc * s2 - (1 - tc)) * (x - tc * mu) / var_t
    return velocity


def test_ode_solvers_converge_at_their_order():
    """Along the exact field, noise z flows to mu + s z; Euler's error halves and Heun's quarters per doubling."""
    mu, s2 = 0.7, 0.25
    z = torch.randn(64, 1, 1, 1, dtype=torch.float64)
    exact = mu + math.sqrt(s2) * z
    flow = FlowMatching()
    for method, order in (("euler", 1), ("heun", 2)):
        errors = []
        for steps in (16, 32):
            x, nfe = ode_sample(flow, gaussian_velocity(mu, s2), z, steps, method)
            assert nfe == steps * (2 if method == "heun" else 1)
            errors.append((x - exact).abs().max().item())
        assert 0.8 * 2 ** order < errors[0] / errors[1] < 1.25 * 2 ** order, (method, errors)


def test_sde_sampler_reaches_the_data_distribution():
    mu, s2 = torch.tensor([0.5, -1.0]).view(1, 2, 1, 1), torch.tensor([0.09, 0.49]).view(1, 2, 1, 1)
    flow = FlowMatching()
    noise = torch.randn(8000, 2, 1, 1)
    gens = torch.Generator().manual_seed(0)
    x, nfe = sde_sample(flow, gaussian_velocity(mu, s2), noise, 100, generator=gens)
    assert nfe == 100 and torch.isfinite(x).all()
    assert torch.allclose(x.mean((0, 2, 3)), mu.flatten(), atol=0.03), x.mean((0, 2, 3))
    assert torch.allclose(x.std((0, 2, 3)), s2.sqrt().flatten(), rtol=0.05), x.std((0, 2, 3))
    again, _ = sde_sample(flow, gaussian_velocity(mu, s2), noise, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, again)
    with pytest.raises(ValueError, match="steps"):
        sde_sample(flow, gaussian_velocity(mu, s2), noise, 1)


class ToyVelocityNet(torch.nn.Module):
    """A small class-conditional MLP on 2-D points stored as (N, 2, 1, 1) images."""

    def __init__(self, num_classes: int, width: int = 96):
        super().__init__()
        self.num_classes = num_classes
        self.label = torch.nn.Embedding(num_classes + 1, width)  # + the null label
        self.inp = torch.nn.Linear(2 + 8, width)
        self.body = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(width, width), torch.nn.SiLU(),
                                        torch.nn.Linear(width, 2))

    def forward(self, x, t, y):
        freqs = torch.arange(1, 5, dtype=x.dtype) * math.pi
        t_feat = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], 1)
        h = self.inp(torch.cat([x.flatten(1), t_feat], 1)) + self.label(y)
        return self.body(h).view(-1, 2, 1, 1)


MODES = torch.tensor([[1.5, 1.5], [-1.5, 1.5], [-1.5, -1.5], [1.5, -1.5]])


def test_trained_toy_mixture_lands_on_its_modes():
    """Train a few hundred steps on a 4-mode mixture (label = mode, 15% null labels), then sample by ODE."""
    torch.manual_seed(0)
    net = ToyVelocityNet(num_classes=4)
    obj = build_objective("flow")
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(400):
        y = torch.randint(0, 4, (256,))
        x0 = (MODES[y] + 0.08 * torch.randn(256, 2)).view(-1, 2, 1, 1)
        y_in = torch.where(torch.rand(256) < 0.15, torch.full_like(y, 4), y)
        loss = obj.training_losses(net, x0, obj.sample_t(256, "cpu"), model_kwargs=dict(y=y_in))["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    y = torch.arange(4).repeat_interleave(100)
    for sampler, cfg in (("heun", 1.0), ("euler", 1.0), ("heun", 2.5), ("sde", 1.0)):
        stats = {}
        x = generate(net, obj, y, (2, 1, 1), sampler=sampler, steps=25, cfg_scale=cfg, stats=stats,
                     generator=torch.Generator().manual_seed(1))
        dist_to_own_mode = (x.flatten(1) - MODES[y]).norm(dim=1)
        assert (dist_to_own_mode < 0.5).float().mean() > 0.9, (sampler, cfg, dist_to_own_mode.median())
        assert stats["nfe"] == (50 if sampler == "heun" else 25)
        assert stats["uncond_rows"] == (stats["nfe"] * len(y) if cfg != 1 else 0)
