"""Post-hoc EMA (fcdm.ema, following EDM2): the profile maths in fp64 against direct computations, the tracking
during training, and reconstruction into a checkpoint that fcdm.load reads."""
import os

import numpy as np
import pytest
import torch

from fcdm import ema as phema
from fcdm.load import load_fcdm

from .test_train_common import assert_state_dicts_equal, run_train


def direct_weights(gamma: float, T: int) -> np.ndarray:
    """The weight of step s's parameters (s = 1..T) in a power-function EMA after step T, written out: the update
    after step s keeps beta_s = (1 - 1/s)**(gamma + 1) of the average, so theta_s keeps (1 - beta_s) times the
    product of the later betas."""
    s = np.arange(1, T + 1, dtype=np.float64)
    beta = (1 - 1 / s) ** (gamma + 1)
    later = np.concatenate([np.cumprod(beta[::-1])[::-1][1:], [1.0]])
    return (1 - beta) * later


def toy_sequence(T: int, D: int = 40) -> np.ndarray:
    """A parameter trajectory with drift, oscillation and noise, (T, D) fp64."""
    rng = np.random.default_rng(0)
    t = np.arange(T, dtype=np.float64)[:, None]
    return (np.cumsum(rng.standard_normal((T, D)), 0) / 10 + np.sin(t / 300 * np.arange(1, D + 1) / 10)
            + 0.1 * rng.standard_normal((T, D)))


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2])
def test_gamma_has_the_relative_std_it_is_named_by(sigma_rel):
    gamma = phema.sigma_rel_to_gamma(sigma_rel)
    assert gamma > 0 and phema.gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    # The discrete weights of a long run: relative std of their time (as a fraction of T) is sigma_rel.
    T = 200_000
    w = direct_weights(gamma, T)
    x = np.arange(1, T + 1) / T
    assert w.sum() == pytest.approx(1, abs=1e-12)
    mean = (w * x).sum()
    assert np.sqrt((w * (x - mean) ** 2).sum()) == pytest.approx(sigma_rel, rel=2e-3)


def test_out_of_range_sigma_rel_is_refused():
    for bad in (0.0, -0.1, 0.29, 1.0):
        with pytest.raises(ValueError, match="sigma_rel must be in"):
            phema.sigma_rel_to_gamma(bad)


def test_inner_product_matches_quadrature():
    for t_a, s_a, t_b, s_b in ((1000, 0.05, 1000, 0.1), (400, 0.05, 1000, 0.1), (1000, 0.15, 300, 0.02)):
        g_a, g_b = phema.sigma_rel_to_gamma(s_a), phema.sigma_rel_to_gamma(s_b)
        tau = np.linspace(0, min(t_a, t_b), 2_000_001)
        p_a = (g_a + 1) * tau ** g_a / t_a ** (g_a + 1)
        p_b = (g_b + 1) * tau ** g_b / t_b ** (g_b + 1)
        numeric = np.trapezoid(p_a * p_b, tau)
        assert phema.profile_inner_product(t_a, g_a, t_b, g_b) == pytest.approx(numeric, rel=1e-6)


def test_reconstruction_matches_a_direct_ema_with_that_profile():
    """Snapshots of sigma_rel 0.05 and 0.10 every 100 of 2000 steps; any other length is rebuilt from them."""
    T, every = 2000, 100
    theta = toy_sequence(T)
    stored = (0.05, 0.10)
    steps, gammas, snapshots = [], [], []
    for sigma_rel in stored:
        gamma = phema.sigma_rel_to_gamma(sigma_rel)
        for t in range(every, T + 1, every):
            steps.append(t), gammas.append(gamma), snapshots.append(direct_weights(gamma, t) @ theta[:t])
    snapshots = np.stack(snapshots)
    direct = {s: direct_weights(phema.sigma_rel_to_gamma(s), T) @ theta for s in (0.03, 0.05, 0.07, 0.1, 0.15)}
    spread = np.linalg.norm(direct[0.05] - direct[0.1])  # how much the EMA length matters on this sequence
    for sigma_rel, tolerance in ((0.05, 1e-10), (0.1, 1e-10), (0.07, 2e-3), (0.15, 5e-3), (0.03, 2e-2)):
        x = phema.solve_coefficients(steps, gammas, T, phema.sigma_rel_to_gamma(sigma_rel))
        assert x.sum() == pytest.approx(1, abs=1e-12)
        error = np.linalg.norm(x @ snapshots - direct[sigma_rel]) / spread
        assert error < tolerance, (sigma_rel, error)
    # Halfway through training, from the snapshots taken so far.
    half = [i for i, t in enumerate(steps) if t <= 1000]
    x = phema.solve_coefficients(np.array(steps)[half], np.array(gammas)[half], 1000, phema.sigma_rel_to_gamma(0.07))
    target = direct_weights(phema.sigma_rel_to_gamma(0.07), 1000) @ theta[:1000]
    assert np.linalg.norm(x @ snapshots[half] - target) / spread < 1e-2


def test_power_ema_tracks_the_direct_weighted_sum():
    T = 50
    theta = torch.from_numpy(toy_sequence(T, 6)).float()
    model = torch.nn.Linear(3, 2, bias=False)  # 6 weights
    tracker = phema.PowerEMA(model, [0.05, 0.2])
    for t in range(1, T + 1):
        with torch.no_grad():
            model.weight.copy_(theta[t - 1].view(2, 3))
        tracker.update(model, t)
    for sigma_rel, module in zip(tracker.sigma_rels, tracker.modules):
        want = direct_weights(phema.sigma_rel_to_gamma(sigma_rel), T) @ theta.double().numpy()
        torch.testing.assert_close(module.weight.double().flatten(), torch.from_numpy(want), rtol=1e-5, atol=1e-5)


POSTHOC = ["--posthoc-ema", "--posthoc-ema-every", "2", "--posthoc-ema-dtype", "fp32", "--ckpt-every", "3"]


def test_training_saves_snapshots_and_reconstruct_writes_a_loadable_checkpoint(tmp_path, capsys):
    _, run_dir = run_train(tmp_path, "--max-train-steps", "6", *POSTHOC)
    snapshots = phema.list_snapshots(run_dir)
    assert [(s, r) for s, r, _ in snapshots] == [(t, r) for t in (2, 4, 6) for r in (0.05, 0.1)]
    out = tmp_path / "phema-0.05.pt"
    assert phema.main(["reconstruct", "--run-dir", run_dir, "--sigma-rel", "0.05", "--out", str(out)]) == 0
    model, loaded = load_fcdm(str(out))
    assert loaded.weights == "ema" and loaded.args["posthoc_ema"]
    last = torch.load(snapshots[-2][2], weights_only=True)["ema"]  # the stored 0.05 profile at step 6
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, last[name], rtol=1e-5, atol=1e-6)
    assert phema.main(["reconstruct", "--run-dir", run_dir, "--sigma-rel", "0.07", "--step", "4",
                       "--out", str(tmp_path / "b.pt")]) == 0
    info = torch.load(tmp_path / "b.pt", weights_only=True)["posthoc_ema"]
    assert info["step"] == 4 and len(info["snapshots"]) == 4
    assert phema.main(["reconstruct", "--run-dir", str(tmp_path), "--sigma-rel", "0.07", "--out", str(out)]) == 2
    assert "has no post-hoc EMA snapshots" in capsys.readouterr().err


def test_resumed_run_continues_the_profiles_exactly(tmp_path):
    _, straight = run_train(tmp_path / "a", "--max-train-steps", "6", *POSTHOC)
    run_train(tmp_path / "b", "--max-train-steps", "3", *POSTHOC)
    _, resumed = run_train(tmp_path / "b", "--max-train-steps", "6", *POSTHOC, "--resume", "auto")
    # The first session also ended with a snapshot (its step 3); every snapshot of the straight run is there, equal.
    resumed_files = {os.path.basename(p): p for _, _, p in phema.list_snapshots(resumed)}
    assert len(resumed_files) == 8
    for _, _, path in phema.list_snapshots(straight):
        name = os.path.basename(path)
        assert_state_dicts_equal(torch.load(path, weights_only=True)["ema"],
                                 torch.load(resumed_files[name], weights_only=True)["ema"], f"snapshot {name}")
