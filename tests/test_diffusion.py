"""DDPM objective: closed forms in fp64, respacing, the hybrid loss and its stop-gradient, and the samplers."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from fcdm.diffusion import (create_diffusion, discretized_gaussian_log_likelihood, normal_kl, respaced_betas,
                            space_timesteps)
from fcdm.objectives import build_objective
from tests.numerics import assert_rel_close

T = 1000


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see conftest


def reference_alpha_bar() -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) for Ho et al.'s linear betas, computed here independently."""
    betas = 1e-4 + (2e-2 - 1e-4) * np.arange(T, dtype=np.float64) / (T - 1)
    return np.exp(np.cumsum(np.log1p(-betas)))


def reference_tanh_cdf(x):
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def test_q_sample_moments_match_closed_form():
    diffusion = create_diffusion("")
    abar = reference_alpha_bar()
    x0 = torch.randn(1, 3, 1, 1, dtype=torch.float64).expand(40_000, 3, 1, 1)
    for t_value in (0, 137, 999):  # first step, a middle one, and the nearly-pure-noise end
        t = torch.full((x0.shape[0],), t_value)
        xt = diffusion.q_sample(x0, t)
        mean, var, log_var = diffusion.q_mean_variance(x0, t)
        assert_rel_close(mean, math.sqrt(abar[t_value]) * x0, 1e-12, "q mean")
        assert_rel_close(var, torch.full_like(x0, 1 - abar[t_value]), 1e-12, "q variance")
        assert_rel_close(log_var, torch.full_like(x0, math.log(1 - abar[t_value])), 1e-12, "q log-variance")
        # Empirical moments: 40k draws give ~1% standard error on the variance.
        assert torch.allclose(xt.mean(0), mean[0], atol=4 * math.sqrt((1 - abar[t_value]) / x0.shape[0]))
        assert torch.allclose(xt.var(0), var[0], rtol=0.04)


def test_posterior_equals_gaussian_conditioning():
    """q(x_{t-1} | x_t, x_0) from Bayes' rule on the two Gaussian factors, in fp64."""
    diffusion = create_diffusion("")
    abar = reference_alpha_bar()
    t = torch.tensor([1, 2, 250, 731, 999])
    x0, xt = torch.randn(5, 2, 3, 3, dtype=torch.float64), torch.randn(5, 2, 3, 3, dtype=torch.float64)
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, xt, t)
    ab, ab_prev = abar[t.numpy()], abar[t.numpy() - 1]
    alpha = ab / ab_prev
    beta = 1 - alpha
    precision = 1 / (1 - ab_prev) + alpha / beta  # prior on x_{t-1} given x0, times likelihood of x_t
    ref_var = torch.from_numpy(1 / precision).view(-1, 1, 1, 1)
    ref_mean = ref_var * (torch.from_numpy(np.sqrt(ab_prev) / (1 - ab_prev)).view(-1, 1, 1, 1) * x0
                          + torch.from_numpy(np.sqrt(alpha) / beta).view(-1, 1, 1, 1) * xt)
    assert_rel_close(mean, ref_mean, 1e-10, "posterior mean")
    assert_rel_close(var, ref_var.expand_as(var), 1e-10, "posterior variance")
    assert_rel_close(log_var, ref_var.log().expand_as(var), 1e-10, "posterior log-variance")
    # At t = 0 the variance is 0; the clipped log-variance borrows t = 1's value instead of -inf.
    _, var0, log_var0 = diffusion.q_posterior_mean_variance(x0[:1], xt[:1], torch.tensor([0]))
    assert var0.abs().max() == 0 and torch.isfinite(log_var0).all()
    assert_rel_close(log_var0, log_var[:1].new_full(log_var0.shape, math.log(ref_var[0, 0, 0, 0].item())), 1e-10)


def test_normal_kl_matches_torch_distributions():
    m1, m2 = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    lv1, lv2 = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    assert_rel_close(normal_kl(m1, lv1, m2, lv2), ref, 1e-12, "KL")
    assert_rel_close(normal_kl(m1, lv1, 0.0, 0.0), torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(0.0, 1.0)), 1e-12, "KL prior")


def test_discretized_gaussian_log_likelihood():
    grid = torch.linspace(-1, 1, 256, dtype=torch.float64)  # the 256 uint8 levels mapped to [-1, 1]
    mean = torch.full_like(grid, 0.137)
    for log_scale in (-3.0, -1.5, 0.2):
        log_p = discretized_gaussian_log_likelihood(grid, means=mean, log_scales=torch.full_like(grid, log_scale))
        # The bins partition the real line, so probabilities sum to 1 (the approximate CDF telescopes).
        assert abs(log_p.exp().sum().item() - 1) < 1e-9
        # Independent fp64 evaluation of the same formula...
        x, std = grid.numpy(), math.exp(log_scale)
        upper = np.where(x > 0.999, 1.0, reference_tanh_cdf((x - 0.137 + 1 / 255) / std))
        lower = np.where(x < -0.999, 0.0, reference_tanh_cdf((x - 0.137 - 1 / 255) / std))
        ref = torch.from_numpy(np.maximum(upper - lower, 1e-12))  # the 1e-12 floor keeps log finite
        # Far-tail bins are differences of two CDF values near 1 (cancellation), so compare them absolutely.
        assert (log_p.exp() - ref).abs().max() < 1e-13
        well_conditioned = ref > 1e-6
        assert_rel_close(log_p[well_conditioned], ref[well_conditioned].log(), 1e-10, "discretised log-likelihood")
        # ...and, within the tanh approximation's error, the exact Gaussian bin probabilities.
        exact = (np.where(x > 0.999, 1.0, norm.cdf((x - 0.137 + 1 / 255) / std))
                 - np.where(x < -0.999, 0.0, norm.cdf((x - 0.137 - 1 / 255) / std)))
        assert np.abs(log_p.exp().numpy() - exact).max() < 1e-3


def test_space_timesteps_and_respaced_betas():
    assert space_timesteps(T, "ddim50") == set(range(0, T, 20))
    steps = sorted(space_timesteps(T, "250"))
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == T - 1 and set(np.diff(steps)) <= {4, 5}
    sections = sorted(space_timesteps(300, "10,15,20"))
    assert len(sections) == 45 and {0, 99, 100, 199, 200, 299} <= set(sections)
    assert sum(s < 100 for s in sections) == 10 and sum(100 <= s < 200 for s in sections) == 15
    assert space_timesteps(300, [10, 15, 20]) == set(sections)
    abar = reference_alpha_bar()
    for spec in ("250", "ddim50", "7,3,40"):
        keep = sorted(space_timesteps(T, spec))
        betas, timestep_map = respaced_betas(abar, keep)
        assert timestep_map == keep
        # The shortened chain keeps the original alpha_bar at every retained step.
        assert np.allclose(np.cumprod(1 - betas), abar[keep], rtol=1e-12, atol=0)
        diffusion = create_diffusion(spec)
        assert diffusion.timestep_map == keep and np.allclose(diffusion.alphas_cumprod, abar[keep], rtol=1e-12)
    for bad in ("ddim999", "2000", "abc", [0], "ddimx"):
        with pytest.raises(ValueError, match="timestep_respacing"):
            space_timesteps(T, bad)


class FixedOutput(torch.nn.Module):
    """Returns a fixed (leaf) output whatever the input, so gradients w.r.t. each channel can be inspected."""

    def __init__(self, out):
        super().__init__()
        self.out = torch.nn.Parameter(out)
        self.seen_t = None

    def forward(self, x, t, y=None):
        self.seen_t = t
        return self.out


@pytest.mark.parametrize("respacing", ["", "ddim50"])
def test_hybrid_loss_matches_independent_fp64(respacing):
    diffusion = create_diffusion(respacing)
    N, C = 6, 3
    x0 = torch.rand(N, C, 4, 4, dtype=torch.float64) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, 7, 20, 33, diffusion.num_timesteps - 1])
    model = FixedOutput(torch.cat([torch.randn_like(x0), torch.rand_like(x0) * 2 - 1], 1))
    losses = diffusion.training_losses(model, x0, t, noise=noise)
    original = torch.tensor(diffusion.timestep_map)[t]
    assert torch.equal(model.seen_t, original), "the model must see the original timesteps"

    abar_all = reference_alpha_bar()
    abar = abar_all[original.numpy()]
    prev_idx = torch.tensor(diffusion.timestep_map)[(t - 1).clamp(min=0)].numpy()
    abar_prev = np.where(t.numpy() > 0, abar_all[prev_idx], 1.0)
    beta = 1 - abar / abar_prev
    post_var = beta * (1 - abar_prev) / (1 - abar)
    post_var_1 = (1 - abar_all[diffusion.timestep_map[1]] / abar_all[diffusion.timestep_map[0]]) * \
        (1 - abar_all[diffusion.timestep_map[0]]) / (1 - abar_all[diffusion.timestep_map[1]])
    min_log = np.log(np.where(t.numpy() == 0, post_var_1, post_var))
    col = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64)).view(-1, 1, 1, 1)  # noqa: E731
    xt = col(np.sqrt(abar)) * x0 + col(np.sqrt(1 - abar)) * noise
    eps, v = model.out.detach()[:, :C], model.out.detach()[:, C:]
    log_var = (v + 1) / 2 * col(np.log(beta)) + (1 - (v + 1) / 2) * col(min_log)
    pred_x0 = (xt - col(np.sqrt(1 - abar)) * eps) / col(np.sqrt(abar))

    def post_mean(start):
        return (col(beta * np.sqrt(abar_prev) / (1 - abar)) * start
                + col((1 - abar_prev) * np.sqrt(1 - beta) / (1 - abar)) * xt)

    m_true, m_model = post_mean(x0), post_mean(pred_x0)
    lv_true = col(min_log)
    kl = 0.5 * (-1 + log_var - lv_true + (lv_true - log_var).exp() + (m_true - m_model) ** 2 * (-log_var).exp())
    std = (0.5 * log_var).exp()
    cdf = lambda z: torch.from_numpy(reference_tanh_cdf(z.numpy()))  # noqa: E731
    upper = torch.where(x0 > 0.999, 1.0, cdf((x0 - m_model + 1 / 255) / std))
    lower = torch.where(x0 < -0.999, 0.0, cdf((x0 - m_model - 1 / 255) / std))
    nll = -(upper - lower).clamp(min=1e-12).log()
    vb = torch.where(t == 0, nll.mean((1, 2, 3)), kl.mean((1, 2, 3))) / math.log(2)
    mse = ((noise - eps) ** 2).mean((1, 2, 3))
    assert_rel_close(losses["mse"], mse, 1e-10, "mse")
    assert_rel_close(losses["vb"], vb, 1e-10, "vb")
    assert_rel_close(losses["loss"], mse + vb, 1e-10, "loss")

    # Stop-gradient: the VB trains only the variance channels, the MSE only the mean channels.
    grad_vb, = torch.autograd.grad(losses["vb"].sum(), model.out, retain_graph=True)
    grad_mse, = torch.autograd.grad(losses["mse"].sum(), model.out)
    assert grad_vb[:, :C].abs().max() == 0 and grad_vb[:, C:].abs().max() > 0
    assert grad_mse[:, C:].abs().max() == 0
    assert_rel_close(grad_mse[:, :C], -2 * (noise - eps) / (C * 16), 1e-12, "mse gradient")


def test_fixed_variance_and_kl_losses():
    x0 = torch.rand(4, 2, 4, 4) * 2 - 1
    t = torch.tensor([0, 5, 500, 999])
    fixed = create_diffusion("", learn_sigma=False)
    losses = fixed.training_losses(FixedOutput(torch.randn_like(x0)), x0, t)
    assert torch.equal(losses["loss"], losses["mse"]) and losses["vb"].abs().max() == 0
    kl = create_diffusion("", use_kl=True)
    model = FixedOutput(torch.randn(4, 4, 4, 4))
    losses = kl.training_losses(model, x0, t)
    assert_rel_close(losses["loss"], losses["vb"] * T, 1e-6, "rescaled KL")
    grad, = torch.autograd.grad(losses["loss"].sum(), model.out)
    assert grad[:, :2].abs().max() > 0, "with use_kl the mean must be trained by the VB"
    with pytest.raises(ValueError, match="model output"):
        fixed.training_losses(FixedOutput(torch.randn(4, 4, 4, 4)), x0, t)
    with pytest.raises(ValueError, match="t must be"):
        fixed.training_losses(FixedOutput(torch.randn_like(x0)), x0, t.float())


class GaussianOracle(torch.nn.Module):
    """The exact E[eps | x_t] for data ~ N(mu, std^2) per channel, with a fixed variance channel v."""

    def __init__(self, mu, std, v):
        super().__init__()
        self.mu, self.var, self.v = mu.view(1, -1, 1, 1), (std ** 2).view(1, -1, 1, 1), v
        self.abar = torch.from_numpy(reference_alpha_bar()).float()
        self.calls = 0

    def forward(self, x, t, y=None):
        self.calls += 1
        ab = self.abar[t].view(-1, 1, 1, 1)
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * self.mu) / (ab * self.var + 1 - ab)
        return torch.cat([eps, torch.full_like(eps, self.v)], dim=1)


def exact_sampler_moments(keep, mu, var, v, sampler):
    """Output mean/variance of the sampler run on GaussianOracle: every step is affine in x plus Gaussian noise,
    so the moments propagate exactly (computed here in fp64, independently of fcdm.diffusion)."""
    abar_all = reference_alpha_bar()
    abar = abar_all[keep]
    abar_prev = np.append(1.0, abar[:-1])
    beta = 1 - abar / abar_prev
    post_var = beta * (1 - abar_prev) / (1 - abar)
    m, s2 = np.zeros_like(mu), np.ones_like(mu)
    for k in range(len(keep) - 1, -1, -1):
        A, Ap = abar[k], abar_prev[k]
        c = np.sqrt(1 - A) / (A * var + 1 - A)                     # eps = c (x - sqrt(A) mu)
        p, q = (1 - np.sqrt(1 - A) * c) / np.sqrt(A), np.sqrt(1 - A) * c * mu   # x0_hat = p x + q
        if sampler == "ddim":
            # x' = x0_hat sqrt(Ap) + sqrt(1 - Ap) eps, with eps re-derived from x0_hat (= the model's eps)
            a = p * np.sqrt(Ap) + np.sqrt(1 - Ap) * c
            b, noise_var = q * np.sqrt(Ap) - np.sqrt(1 - Ap) * c * np.sqrt(A) * mu, 0.0
        else:
            coef1, coef2 = beta[k] * np.sqrt(Ap) / (1 - A), (1 - Ap) * np.sqrt(1 - beta[k]) / (1 - A)
            a, b = coef1 * p + coef2, coef1 * q
            min_log = np.log(post_var[1] if k == 0 else post_var[k])
            noise_var = 0.0 if k == 0 else np.exp((v + 1) / 2 * np.log(beta[k]) + (1 - (v + 1) / 2) * min_log)
        m, s2 = a * m + b, a ** 2 * s2 + noise_var
    return m, np.sqrt(s2)


@pytest.mark.parametrize("sampler,v", [("ddpm", -1.0), ("ddpm", 1.0), ("ddim", 0.0)])
def test_sampler_recovers_gaussian_data(sampler, v):
    mu, std = torch.tensor([0.6, -0.3], dtype=torch.float64), torch.tensor([0.4, 0.9], dtype=torch.float64)
    model = GaussianOracle(mu.float(), std.float(), v)
    diffusion = create_diffusion("100")
    N = 6000
    noise = torch.randn(N, 2, 1, 1)
    loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
    x = loop(model, noise.shape, noise, clip_denoised=False).double()
    assert model.calls == 100 and torch.isfinite(x).all()
    exact_mean, exact_std = (torch.from_numpy(a) for a in exact_sampler_moments(
        sorted(diffusion.timestep_map), mu.numpy(), (std ** 2).numpy(), v, sampler))
    # The sampler does what its maths says: empirical moments within ~4 standard errors of the exact ones...
    assert torch.allclose(x.mean((0, 2, 3)), exact_mean, atol=4 * exact_std.max().item() / N ** 0.5)
    assert torch.allclose(x.std((0, 2, 3)), exact_std, rtol=4 / (2 * N) ** 0.5)
    # ...and 100 steps recover the data distribution (the small-variance choice under-disperses by a few %).
    assert torch.allclose(exact_mean, mu, atol=0.01), exact_mean
    assert torch.allclose(exact_std, std, rtol=0.08), exact_std


def test_ddim_eta0_is_deterministic_and_eta1_is_not():
    model = GaussianOracle(torch.tensor([0.2, 0.1]), torch.tensor([0.5, 0.7]), 0.0)
    diffusion = create_diffusion("ddim25")
    noise = torch.randn(8, 2, 2, 2)
    runs = [diffusion.ddim_sample_loop(model, noise.shape, noise, eta=0.0, clip_denoised=False,
                                       generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert torch.equal(runs[0], runs[1])
    stochastic = [diffusion.ddim_sample_loop(model, noise.shape, noise, eta=1.0, clip_denoised=False,
                                             generator=torch.Generator().manual_seed(s)) for s in (1, 2, 1)]
    assert not torch.allclose(stochastic[0], stochastic[1]) and torch.equal(stochastic[0], stochastic[2])


def test_per_sample_generators_make_samples_batch_independent():
    model = GaussianOracle(torch.tensor([0.2, 0.1]), torch.tensor([0.5, 0.7]), 0.5)
    diffusion = create_diffusion("10")
    noise = torch.randn(4, 2, 1, 1)
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(4)]  # noqa: E731
    whole = diffusion.p_sample_loop(model, noise.shape, noise, generator=gens())
    halves = [diffusion.p_sample_loop(model, (2, 2, 1, 1), noise[s], generator=gens()[s])
              for s in (slice(0, 2), slice(2, 4))]
    assert torch.allclose(whole, torch.cat(halves), rtol=0, atol=1e-6)


def test_ddpm_objective_interface():
    obj = build_objective("ddpm")
    t = obj.sample_t(4096, "cpu")
    assert t.dtype == torch.long and t.min() >= 0 and t.max() < T and t.float().std() > 250
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(obj.sample_t(16, "cpu", g()), obj.sample_t(16, "cpu", g()))
    x0 = torch.randn(3, 2, 4, 4)
    losses = obj.training_losses(FixedOutput(torch.randn(3, 4, 4, 4)), x0, obj.sample_t(3, "cpu"))
    assert set(losses) == {"loss", "mse", "vb"} and losses["loss"].shape == (3,)
    with pytest.raises(ValueError, match="objective"):
        build_objective("score_sde")
    with pytest.raises(ValueError, match="noise_schedule"):
        build_objective("ddpm", noise_schedule="quadratic")


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_sampling_without_noise_starts_on_the_models_device(loop):
    """DiT's interface: `p_sample_loop(model, shape)` draws x_T on the model's device (the meta device stands in for
    a GPU here), not on the CPU."""
    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1, device="meta"))

        def forward(self, x, t, **kwargs):
            assert x.device == t.device == self.w.device, (x.device, t.device)
            return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:], device=x.device)

    x = getattr(create_diffusion("4"), loop)(Stub(), (2, 4, 8, 8), clip_denoised=False)
    assert x.device.type == "meta" and x.shape == (2, 4, 8, 8)
