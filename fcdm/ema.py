"""Post-hoc EMA (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2): choose the
EMA length after training instead of before it.

During training (`train.py --posthoc-ema`) a few power-function EMAs of the weights are tracked, each with its own
relative standard deviation sigma_rel, and each is saved at regular intervals as a snapshot. Afterwards

    python -m fcdm.ema reconstruct --run-dir results/000-FCDM-XL --sigma-rel 0.07 --out phema-0.07.pt

writes the weights an EMA with any other sigma_rel would have produced: a linear combination of the snapshots whose
coefficients come from a least-squares fit of the wanted averaging profile. The result is a checkpoint with the
official `ema` key, which sample.py and fcdm.load read as they read any training checkpoint.

The maths. A power-function EMA with exponent gamma, at training step t, averages the weights theta(tau) seen so far
with weights proportional to tau**gamma on [0, t]. Its profile p(tau) = (gamma + 1) tau**gamma / t**(gamma + 1) has
a standard deviation, relative to t, of sigma_rel = sqrt((gamma + 1) / ((gamma + 2)**2 (gamma + 3))), the length
that names it. It is tracked with ema <- beta ema + (1 - beta) theta after step t, beta = (1 - 1/t)**(gamma + 1).
Two profiles (t_a, gamma_a) and (t_b, gamma_b) have the inner product

    <p_a, p_b> = (gamma_a + 1) (gamma_b + 1) min(t_a, t_b)**(gamma_a + gamma_b + 1)
                 / ((gamma_a + gamma_b + 1) t_a**(gamma_a + 1) t_b**(gamma_b + 1)),

so the snapshot combination sum_i x_i p_i closest (in L2) to a target profile solves the normal equations G x = c
with G_ij = <p_i, p_j> and c_i = <p_i, p_target>. The coefficients are finally scaled to sum to one, so that a
constant weight sequence is reproduced exactly.
"""
from __future__ import annotations

import argparse
import copy
import glob
import os
import re
import sys

import numpy as np
import torch
import torch.nn as nn

from fcdm.files import atomic_torch_save
from fcdm.load import read_checkpoint_file

SNAPSHOT_FORMAT = "fcdm-posthoc-ema-v1"
SNAPSHOT_DIR = "posthoc_ema"
# sigma_rel of the profile with gamma = 0 (a plain running mean); longer averages would need gamma < 0.
MAX_SIGMA_REL = float(np.sqrt(1 / 12))
_SNAPSHOT_NAME = re.compile(r"^(\d{7,})-sigma(\d+\.\d+)\.pt$")


# ---- profiles ------------------------------------------------------------------------------------------------------
def gamma_to_sigma_rel(gamma):
    """Relative standard deviation of the power-function profile with exponent gamma (> -1)."""
    gamma = np.float64(gamma)
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma >= 0 whose profile has this sigma_rel: the largest real root of
    (gamma + 2)**2 (gamma + 3) - (gamma + 1) / sigma_rel**2, a cubic."""
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}), got {sigma_rel}")
    inv = np.float64(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def power_beta(gamma: float, step: int) -> float:
    """The decay that keeps the power-function profile after optimiser step `step` (1, 2, ...); 0 at step 1."""
    if step < 1:
        raise ValueError(f"steps count from 1, got {step}")
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def profile_inner_product(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """<p_a, p_b> of power-function profiles ending at steps t_a and t_b (broadcasting numpy arrays)."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    lo = np.minimum(t_a, t_b)
    # Written with ratios (<= 1) so that large step counts neither overflow nor underflow.
    return ((gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1) / lo
            * (lo / t_a) ** (gamma_a + 1) * (lo / t_b) ** (gamma_b + 1))


def solve_coefficients(steps, gammas, target_step: int, target_gamma: float) -> np.ndarray:
    """Least-squares coefficients x (summing to 1) such that sum_i x_i p_i approximates the target profile."""
    steps, gammas = np.asarray(steps, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
    gram = profile_inner_product(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
    rhs = profile_inner_product(steps, gammas, target_step, target_gamma)
    x = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    return x / x.sum()


# ---- tracking during training --------------------------------------------------------------------------------------
def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 (DTensor) parameter, or the tensor itself: EMA updates are elementwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def fp32_copy(model: nn.Module) -> nn.Module:
    """A frozen fp32 copy of `model` in eval mode: the starting point of every EMA."""
    return copy.deepcopy(model).float().eval().requires_grad_(False)


@torch.no_grad()
def lerp_average_(average: nn.Module, model: nn.Module, weight: float) -> None:
    """average <- average + weight * (model - average) on the parameters (this rank's shards); buffers copied."""
    mine = [local_tensor(p) for p in average.parameters()]
    torch._foreach_lerp_(mine, [local_tensor(p).detach().float() for p in model.parameters()], weight)
    for e, b in zip(average.buffers(), model.buffers()):
        e.copy_(b)


def _state_dict(module: nn.Module) -> dict:
    return module.state_dict()


class PowerEMA:
    """fp32 power-function EMAs of a model, one per sigma_rel, updated after every optimiser step. Under FSDP2 the
    trainer shards `modules` like the model; `state_of` / `load` then gather and scatter full state dicts."""

    def __init__(self, model: nn.Module, sigma_rels):
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.modules = [fp32_copy(model) for _ in self.sigma_rels]

    def update(self, model: nn.Module, step: int) -> None:
        """Fold in the weights after optimiser step `step` (counted from 1)."""
        for gamma, module in zip(self.gammas, self.modules):
            lerp_average_(module, model, 1.0 - power_beta(gamma, step))

    def state_dict(self, state_of=_state_dict) -> dict:
        return {"sigma_rels": list(self.sigma_rels), "modules": [state_of(m) for m in self.modules]}

    def load_state_dict(self, state: dict, load=nn.Module.load_state_dict) -> None:
        if [float(s) for s in state["sigma_rels"]] != self.sigma_rels:
            raise ValueError(f"the checkpoint tracks post-hoc EMAs with sigma_rel {state['sigma_rels']}, this run "
                             f"asks for {self.sigma_rels} (--posthoc-ema-sigma-rels)")
        for module, sd in zip(self.modules, state["modules"]):
            load(module, sd)

    def save_snapshots(self, directory: str, step: int, args: dict, dtype: torch.dtype = torch.float16,
                       state_of=_state_dict, write: bool = True) -> list[str]:
        """Write one snapshot file per profile for optimiser step `step` (when `write`: under FSDP every rank
        gathers, one writes); returns their paths."""
        os.makedirs(directory, exist_ok=True)
        paths = []
        for sigma_rel, gamma, module in zip(self.sigma_rels, self.gammas, self.modules):
            path = os.path.join(directory, snapshot_name(step, sigma_rel))
            weights = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype)
                       for k, v in state_of(module).items()}
            if not write:
                continue
            atomic_torch_save({"ema": weights, "step": step, "sigma_rel": sigma_rel, "gamma": gamma, "args": args,
                               "format": SNAPSHOT_FORMAT}, path)
            paths.append(path)
        return paths


def snapshot_name(step: int, sigma_rel: float) -> str:
    return f"{step:07d}-sigma{sigma_rel:.4f}.pt"


# ---- reconstruction after training ---------------------------------------------------------------------------------
def list_snapshots(run_dir: str) -> list[tuple[int, float, str]]:
    """(step, sigma_rel, path) of a run's snapshots, in step order."""
    found = []
    for path in glob.glob(os.path.join(run_dir, SNAPSHOT_DIR, "*.pt")):
        m = _SNAPSHOT_NAME.match(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), float(m.group(2)), path))
    return sorted(found)


def reconstruct(run_dir: str, sigma_rel: float, step: int | None = None, log=print) -> dict:
    """The checkpoint dict of the EMA with `sigma_rel` at `step` (default: the last snapshot's), from the run's
    snapshots up to that step: {"ema", "args", "posthoc_ema"}."""
    snapshots = list_snapshots(run_dir)
    if not snapshots:
        raise ValueError(f"--run-dir {run_dir!r} has no post-hoc EMA snapshots in {SNAPSHOT_DIR}/ "
                         f"(train with --posthoc-ema)")
    step = snapshots[-1][0] if step is None else step
    used = [s for s in snapshots if s[0] <= step]
    if not used:
        raise ValueError(f"--step {step}: the first snapshot is at step {snapshots[0][0]}")
    target_gamma = sigma_rel_to_gamma(sigma_rel)
    x = solve_coefficients([s[0] for s in used], [sigma_rel_to_gamma(s[1]) for s in used], step, target_gamma)
    total, args = None, {}
    for coefficient, (_, _, path) in zip(x, used):
        snapshot = read_checkpoint_file(path)
        args = snapshot.get("args", args)
        if total is None:
            total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in snapshot["ema"].items()}
        for k, v in snapshot["ema"].items():
            total[k] += float(coefficient) * v.double()
    log(f"sigma_rel {sigma_rel} at step {step} from {len(used)} snapshots (coefficients from {x.min():.3g} "
        f"to {x.max():.3g})")
    return {"ema": {k: v.float() for k, v in total.items()}, "args": args,
            "posthoc_ema": {"sigma_rel": sigma_rel, "step": step, "coefficients": x.tolist(),
                            "snapshots": [os.path.basename(s[2]) for s in used]}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fcdm.ema", description="Post-hoc EMA (EDM2) of a training run.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reconstruct", help="write the EMA of a chosen sigma_rel as a checkpoint")
    r.add_argument("--run-dir", required=True, help="the run directory (holds posthoc_ema/)")
    r.add_argument("--sigma-rel", type=float, required=True, help=f"relative EMA length in (0, {MAX_SIGMA_REL:.3f})")
    r.add_argument("--step", type=int, default=None, help="training step to reconstruct at (default: the last "
                   "snapshot's)")
    r.add_argument("--out", required=True, help="checkpoint to write (sample.py --ckpt reads it)")
    args = p.parse_args(argv)
    try:
        ckpt = reconstruct(args.run_dir, args.sigma_rel, args.step)
    except ValueError as err:
        print(f"fcdm.ema: error: {err}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_torch_save(ckpt, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
