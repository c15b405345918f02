"""SiT-style flow matching on the linear path: time sampling, the training loss, and drift/score for samplers."""
from __future__ import annotations

from typing import Optional

import torch

from ..diffusion.gaussian_diffusion import mean_flat
from .path import LinearPath, expand_like

PREDICTIONS = ("velocity", "noise", "score")
T_SAMPLINGS = ("uniform", "logit_normal")
LOSS_WEIGHTS = (None, "velocity", "likelihood")


class FlowMatching:
    """Linear-path flow matching; the model predicts velocity (default), noise or score at continuous t in [0, 1]."""

    def __init__(self, prediction: str = "velocity", t_sampling: str = "uniform", loss_weight: Optional[str] = None,
                 train_eps: Optional[float] = None, sample_eps: Optional[float] = None,
                 logit_normal_mean: float = 0.0, logit_normal_std: float = 1.0, path: str = "linear"):
        if path != "linear":
            raise ValueError(f"path must be 'linear' (the only path implemented), got {path!r}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f"t_sampling must be one of {T_SAMPLINGS}, got {t_sampling!r}")
        if loss_weight not in LOSS_WEIGHTS:
            raise ValueError(f"loss_weight must be one of {LOSS_WEIGHTS}, got {loss_weight!r}")
        if not logit_normal_std > 0:
            raise ValueError(f"logit_normal_std must be > 0, got {logit_normal_std}")
        self.path = LinearPath()
        self.prediction, self.t_sampling, self.loss_weight = prediction, t_sampling, loss_weight
        self.logit_normal_mean, self.logit_normal_std = logit_normal_mean, logit_normal_std
        # Velocity is finite on all of [0, 1]; noise and score divide by t or 1 - t, so SiT keeps 1e-3 off both ends.
        default_eps = 0.0 if prediction == "velocity" else 1e-3
        self.train_eps = default_eps if train_eps is None else float(train_eps)
        self.sample_eps = default_eps if sample_eps is None else float(sample_eps)
        for name, eps in (("train_eps", self.train_eps), ("sample_eps", self.sample_eps)):
            if not 0.0 <= eps < 0.5:
                raise ValueError(f"{name} must be in [0, 0.5), got {eps}")

    # ---- training ---------------------------------------------------------------------------------------------
    def train_interval(self) -> tuple[float, float]:
        eps = 0.0 if self.prediction == "velocity" else self.train_eps
        return eps, 1.0 - eps

    def sample_t(self, batch_size: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Training times in [t0, t1]: uniform, or a logit-normal sigmoid(N(m, s)) (SD3) mapped into the interval."""
        gen_device = generator.device if generator is not None else device
        if self.t_sampling == "uniform":
            u = torch.rand(batch_size, generator=generator, device=gen_device)
        else:
            z = torch.randn(batch_size, generator=generator, device=gen_device)
            u = torch.sigmoid(self.logit_normal_mean + self.logit_normal_std * z)
        t0, t1 = self.train_interval()
        return (u * (t1 - t0) + t0).to(device)

    def training_losses(self, model, x_start: torch.Tensor, t: torch.Tensor, model_kwargs=None,
                        noise: Optional[torch.Tensor] = None) -> dict:
        """Per-sample losses dict(loss, mse), each (N,). x_start is the data, noise the t = 0 end of the path.

        A learned-sigma model's extra channels are ignored (its first C channels are the prediction, as in SiT).
        """
        if t.shape != (x_start.shape[0],) or not t.is_floating_point():
            raise ValueError(f"t must be a float tensor of shape ({x_start.shape[0]},), got {t.dtype} "
                             f"{tuple(t.shape)}")
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        t = t.to(x_start.dtype)
        x_t = self.path.interpolate(t, noise, x_start)
        pred = self.prediction_channels(model(x_t, t, **(model_kwargs or {})), x_t)
        if self.prediction == "velocity":
            mse = mean_flat((pred - self.path.target_velocity(noise, x_start)) ** 2)
            return {"loss": mse, "mse": mse}
        if self.prediction == "noise":
            err = (pred - noise) ** 2
        else:
            sigma = self.path.sigma(t, x_t)
            err = (pred * sigma + noise) ** 2  # score target -noise / sigma, scaled by sigma as in SiT
        weight = self._loss_weight(t, x_t)
        return {"loss": mean_flat(weight * err), "mse": mean_flat(err)}

    def _loss_weight(self, t: torch.Tensor, x: torch.Tensor):
        if self.loss_weight is None:
            return 1.0
        drift_var, sigma = self.path.drift_variance(t, x), self.path.sigma(t, x)
        return (drift_var / sigma) ** 2 if self.loss_weight == "velocity" else drift_var / sigma ** 2

    # ---- sampling ---------------------------------------------------------------------------------------------
    @staticmethod
    def prediction_channels(output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        C = x.shape[1]
        if output.shape[0] != x.shape[0] or output.shape[1] not in (C, 2 * C) or output.shape[2:] != x.shape[2:]:
            raise ValueError(f"model output must have shape {(x.shape[0], C, *x.shape[2:])} "
                             f"(or 2*{C} channels with learned sigma), got {tuple(output.shape)}")
        return output[:, :C].to(x.dtype)

    def velocity_and_score(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor):
        """Velocity and score of the probability flow at (x, t) from one model output."""
        pred = self.prediction_channels(output, x)
        if self.prediction == "velocity":
            return pred, self.path.score_from_velocity(pred, x, t)
        score = pred / -self.path.sigma(t, x) if self.prediction == "noise" else pred
        return self.path.velocity_from_score(score, x, t), score

    def sample_interval(self, sde: bool = False, last_step_size: float = 0.0) -> tuple[float, float]:
        """Integration range [t0, t1] in SiT's convention (the SDE stops short by its final mean step)."""
        t0 = 0.0 if self.prediction == "velocity" else self.sample_eps
        t1 = 1.0 - (last_step_size if sde and last_step_size > 0 else 0.0 if self.prediction == "velocity"
                    else self.sample_eps)
        return t0, t1

    @staticmethod
    def noise_level(t: torch.Tensor) -> torch.Tensor:
        """Fraction of the way to pure noise: 1 - t (for guidance intervals shared with DDPM)."""
        return 1 - t.float()


__all__ = ["FlowMatching", "PREDICTIONS", "T_SAMPLINGS", "expand_like"]
