"""SiT-style flow matching (linear path, velocity prediction by default) and its ODE/SDE samplers.

    flow = FlowMatching()                                    # prediction="velocity", t_sampling="uniform"
    t = flow.sample_t(N, device)                             # float in [0, 1]; t = 0 noise, t = 1 data
    losses = flow.training_losses(model, x0, t, model_kwargs=dict(y=y))   # loss, mse: (N,) each
    x, nfe = ode_sample(flow, lambda x, t: model(x, t, y), noise, steps=50, method="heun")
"""
from .path import LinearPath
from .solvers import ode_sample, sde_sample
from .transport import PREDICTIONS, T_SAMPLINGS, FlowMatching

__all__ = ["FlowMatching", "LinearPath", "ode_sample", "sde_sample", "PREDICTIONS", "T_SAMPLINGS"]
