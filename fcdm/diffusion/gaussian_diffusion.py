"""Discrete Gaussian diffusion (DDPM) with a learned-range variance: the training loss and the DDPM/DDIM samplers.

The maths follows Ho et al. 2020 and Nichol & Dhariwal 2021 (IDDPM) exactly as ADM/DiT implement it, because the
official FCDM trains and samples with DiT's `create_diffusion`: schedule tables are fp64, each lookup is cast to the
working dtype (fp32 for fp32/bf16 inputs, fp64 for fp64 inputs), and the variational bound is in bits.
Time index t counts steps of this (possibly respaced) chain; the model sees `timestep_map[t]`, the original step.
"""
from __future__ import annotations

import enum
import math
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .likelihoods import discretized_gaussian_log_likelihood, normal_kl
from .noise import GeneratorLike, gaussian_noise, module_device


class ModelMeanType(enum.Enum):
    """What the first C output channels predict."""
    EPSILON = "epsilon"
    START_X = "start_x"


class ModelVarType(enum.Enum):
    """Where the reverse-step variance comes from."""
    FIXED_SMALL = "fixed_small"      # the posterior variance beta~_t
    FIXED_LARGE = "fixed_large"      # beta_t
    LEARNED = "learned"              # the model outputs log-variance
    LEARNED_RANGE = "learned_range"  # the model outputs v in [-1, 1] interpolating log beta~_t .. log beta_t


class LossType(enum.Enum):
    """Training loss: epsilon/x0 MSE (+ VB when the variance is learned), or the VB alone."""
    MSE = "mse"
    RESCALED_MSE = "rescaled_mse"
    KL = "kl"
    RESCALED_KL = "rescaled_kl"


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch one. (N, ...) -> (N,)"""
    return x.mean(dim=tuple(range(1, x.dim())))


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class GaussianDiffusion:
    """A T-step diffusion chain given its betas; `timestep_map` names the original step behind each index."""

    def __init__(self, *, betas, model_mean_type: ModelMeanType = ModelMeanType.EPSILON,
                 model_var_type: ModelVarType = ModelVarType.LEARNED_RANGE, loss_type: LossType = LossType.MSE,
                 timestep_map: Optional[list[int]] = None, original_num_steps: Optional[int] = None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a non-empty 1-D array with every value in (0, 1]")
        self.model_mean_type, self.model_var_type, self.loss_type = model_mean_type, model_var_type, loss_type
        self.num_timesteps = len(betas)
        self.timestep_map = list(range(self.num_timesteps)) if timestep_map is None else list(timestep_map)
        if len(self.timestep_map) != self.num_timesteps:
            raise ValueError(f"timestep_map has {len(self.timestep_map)} entries for {self.num_timesteps} betas")
        self.original_num_steps = original_num_steps or self.num_timesteps

        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        # Posterior q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7).
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # beta~_0 = 0, so its log is replaced by beta~_1's (a one-step chain has no such value and keeps beta).
        clipped = np.append(posterior_variance[1], posterior_variance[1:]) if len(betas) > 1 else betas
        tables = dict(
            betas=betas,
            log_betas=np.log(betas),
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
            log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=np.log(clipped),
            posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        )
        # FIXED_LARGE uses beta_t, except beta~_1 at t = 0 for a better decoder likelihood (IDDPM).
        large = np.append(posterior_variance[1], betas[1:]) if len(betas) > 1 else betas
        tables["fixed_large_variance"], tables["fixed_large_log_variance"] = large, np.log(large)
        for name, value in tables.items():
            setattr(self, name, value)
        tables["timestep_map"] = np.asarray(self.timestep_map, dtype=np.int64)
        self._tables = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tables.items()}
        self._tables_on = {torch.device("cpu"): self._tables}

    # ---- lookups ----------------------------------------------------------------------------------------------
    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        # Copied to each device once: a sampling step does about ten lookups, each would otherwise be a host copy.
        if device not in self._tables_on:
            self._tables_on[device] = {k: v.to(device) for k, v in self._tables.items()}
        return self._tables_on[device][name]

    def _extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """table[t] as (N, 1, 1, ...) in the working dtype of x."""
        values = self._table(name, t.device)[t].to(_work_dtype(x))
        return values.view(-1, *([1] * (x.dim() - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Indices of this chain -> the original timesteps the model was trained on."""
        return self._table("timestep_map", t.device)[t].to(t.dtype)

    def _check_t(self, t: torch.Tensor, x: torch.Tensor) -> None:
        if t.shape != (x.shape[0],) or t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"t must be an integer tensor of shape ({x.shape[0]},), got {t.dtype} {tuple(t.shape)}")

    # ---- forward process --------------------------------------------------------------------------------------
    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = 1.0 - self._extract("alphas_cumprod", t, x_start)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start)
        return mean, variance.expand_as(x_start), log_variance.expand_as(x_start)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._extract("posterior_mean_coef1", t, x_t) * x_start
                + self._extract("posterior_mean_coef2", t, x_t) * x_t)
        variance = self._extract("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t, t, eps):
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t))

    # ---- reverse process --------------------------------------------------------------------------------------
    def _split_output(self, output: torch.Tensor, x: torch.Tensor):
        """(N, C or 2C, ...) model output -> (mean prediction, variance channels or None)."""
        C = x.shape[1]
        learned = self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
        expected = (x.shape[0], 2 * C if learned else C, *x.shape[2:])
        if tuple(output.shape) != expected:
            raise ValueError(f"model output must have shape {expected} ({'learned' if learned else 'fixed'} "
                             f"variance), got {tuple(output.shape)}")
        output = output.to(_work_dtype(x))
        return (output[:, :C], output[:, C:]) if learned else (output, None)

    def p_mean_variance_from_output(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                                    clip_denoised: bool = True, denoised_fn: Optional[Callable] = None) -> dict:
        """p(x_{t-1} | x_t) from a model output: dict(mean, variance, log_variance, pred_xstart)."""
        mean_out, var_out = self._split_output(output, x)
        if self.model_var_type == ModelVarType.LEARNED:
            log_variance = var_out
        elif self.model_var_type == ModelVarType.LEARNED_RANGE:
            min_log = self._extract("posterior_log_variance_clipped", t, x)
            max_log = self._extract("log_betas", t, x)
            frac = (var_out + 1) / 2  # v = -1 -> beta~_t, v = +1 -> beta_t (IDDPM eq. 15)
            log_variance = frac * max_log + (1 - frac) * min_log
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            log_variance = self._extract("fixed_large_log_variance", t, x).expand_as(x)
        else:
            log_variance = self._extract("posterior_log_variance_clipped", t, x).expand_as(x)
        if self.model_var_type == ModelVarType.FIXED_LARGE:
            variance = self._extract("fixed_large_variance", t, x).expand_as(x)
        elif self.model_var_type == ModelVarType.FIXED_SMALL:
            variance = self._extract("posterior_variance", t, x).expand_as(x)
        else:
            variance = torch.exp(log_variance)

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = mean_out
        else:
            pred_xstart = self.predict_xstart_from_eps(x, t, mean_out)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_mean_variance(self, model, x, t, clip_denoised: bool = True, denoised_fn=None, model_kwargs=None) -> dict:
        """Run the model (at the original timesteps) and return p(x_{t-1} | x_t) as a dict."""
        self._check_t(t, x)
        output = model(x, self.model_timesteps(t), **(model_kwargs or {}))
        return self.p_mean_variance_from_output(output, x, t, clip_denoised, denoised_fn)

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                 generator: GeneratorLike = None) -> dict:
        """One ancestral step x_t -> x_{t-1} (no noise at t = 0)."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = gaussian_noise(x.shape, generator, x.device, out["mean"].dtype)
        nonzero = (t != 0).to(out["mean"].dtype).view(-1, *([1] * (x.dim() - 1)))
        return {"sample": out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise,
                "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta: float = 0.0,
                    generator: GeneratorLike = None) -> dict:
        """One DDIM step (Song et al. 2021, eq. 12); eta = 0 is deterministic, eta = 1 matches DDPM's variance."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])  # re-derived, so x0-prediction works too
        alpha_bar = self._extract("alphas_cumprod", t, x)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = gaussian_noise(x.shape, generator, x.device, eps.dtype)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        nonzero = (t != 0).to(eps.dtype).view(-1, *([1] * (x.dim() - 1)))
        return {"sample": mean_pred + nonzero * sigma * noise, "pred_xstart": out["pred_xstart"]}

    def _loop(self, step, shape, noise, device, progress):
        if not isinstance(shape, (tuple, list)):
            raise ValueError(f"shape must be a tuple (N, C, H, W), got {shape!r}")
        x = noise if noise is not None else torch.randn(*shape, device=device)
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"noise shape {tuple(x.shape)} != shape {tuple(shape)}")
        indices = range(self.num_timesteps - 1, -1, -1)
        if progress:
            indices = tqdm(indices, leave=False)
        with torch.no_grad():
            for i in indices:
                x = step(x, torch.full((shape[0],), i, device=x.device, dtype=torch.long))["sample"]
        return x

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                      device=None, progress=False, generator: GeneratorLike = None) -> torch.Tensor:
        """Ancestral sampling from x_T = noise through every step of this chain (on the model's device by default)."""
        return self._loop(lambda x, t: self.p_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs,
                                                     generator), shape, noise, device or module_device(model), progress)

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                         device=None, progress=False, eta: float = 0.0, generator: GeneratorLike = None):
        """DDIM sampling from x_T = noise through every step of this chain."""
        if not 0.0 <= eta:
            raise ValueError(f"eta must be >= 0, got {eta}")
        return self._loop(lambda x, t: self.ddim_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs, eta,
                                                        generator), shape, noise, device or module_device(model),
                          progress)

    # ---- training ---------------------------------------------------------------------------------------------
    def vb_terms_bpd(self, output, x_start, x_t, t, clip_denoised: bool = False) -> torch.Tensor:
        """One term of the variational bound in bits per dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0,
        the decoder NLL -log p(x_0 | x_1) at t = 0. (N,)"""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(output, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model, x_start: torch.Tensor, t: torch.Tensor, model_kwargs=None,
                        noise: Optional[torch.Tensor] = None) -> dict:
        """Per-sample losses at timesteps t: dict(loss, mse, vb), each (N,).

        Hybrid objective (IDDPM): mse of the epsilon (or x0) prediction plus the VB on the variance channels with the
        mean output detached, so the VB trains only the variance. With a fixed variance vb is 0; with use_kl the
        loss is the VB itself (times T when rescaled) and mse is reported but not trained on.
        """
        self._check_t(t, x_start)
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        mean_out, var_out = self._split_output(output, x_t)
        target = x_start if self.model_mean_type == ModelMeanType.START_X else noise
        mse = mean_flat((target - mean_out) ** 2)

        if self.loss_type in (LossType.KL, LossType.RESCALED_KL):
            vb = self.vb_terms_bpd(output, x_start, x_t, t)
            loss = vb * self.num_timesteps if self.loss_type == LossType.RESCALED_KL else vb
            return {"loss": loss, "mse": mse.detach(), "vb": vb}
        if var_out is None:
            vb = torch.zeros_like(mse)
        else:
            frozen = torch.cat([mean_out.detach(), var_out], dim=1)
            vb = self.vb_terms_bpd(frozen, x_start, x_t, t)
            if self.loss_type == LossType.RESCALED_MSE:
                vb = vb * (self.num_timesteps / 1000.0)  # keeps the VB's weight relative to the MSE as in IDDPM
        return {"loss": mse + vb, "mse": mse, "vb": vb}
