"""Shared helpers for the trainer tests (tiny configs that run in seconds on 2 CPU cores), plus unit tests of the
small pieces: EMA, lr schedule, train state, RNG capture, the NaN guard's counting."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from fcdm.train import resume as ckpt_io
from fcdm.train.config import parse_args
from fcdm.train.ema import EMA
from fcdm.train.guards import NonFiniteStepError, check_step
from fcdm.train.loop import lr_at, train
from fcdm.train.state import TrainState, capture_rng, restore_rng

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A 0.05M-parameter FCDM on 8x8 procedural images: every flag that makes a run slow is turned down.
TINY = ["--hidden-size", "8", "--depth", "1", "1", "1", "1", "1", "--image-size", "8", "--global-batch-size", "4",
        "--dataset-size", "40", "--num-sampling-steps", "2", "--no-final-eval", "--no-progress", "--log-every", "1",
        "--lr", "1e-3", "--warmup-steps", "2", "--backend", "torch", "--num-workers", "0", "--device", "cpu"]


def tiny_args(results_dir, *extra):
    return parse_args([*TINY, "--results-dir", str(results_dir), "--run-name", "run", *map(str, extra)])


def run_train(results_dir, *extra):
    """Train in this process; returns (final TrainState, run directory)."""
    state = train(tiny_args(results_dir, *extra))
    return state, os.path.join(str(results_dir), "run")


def final_checkpoint(run_dir) -> dict:
    step, path = ckpt_io.list_checkpoints(os.path.join(run_dir, "checkpoints"))[-1]
    return ckpt_io.load(path)


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_script(args, timeout=180, env_extra=None, torchrun_procs=None):
    """Run train.py (optionally under torchrun) in a subprocess; returns CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable]
    if torchrun_procs:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_procs}"]
    cmd += [os.path.join(REPO, "train.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def slow_loader_path(tmp_path) -> str:
    """A PYTHONPATH entry whose sitecustomize slows the procedural data down (a sleep per item), so that a signal
    sent to a training subprocess lands mid-run."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import time, fcdm.data.procedural as p\n"
        "_get = p.ProceduralShapes.__getitem__\n"
        "p.ProceduralShapes.__getitem__ = lambda self, key: (time.sleep(0.05), _get(self, key))[1]\n")
    return str(shim)


def signal_mid_run(cmd, env, sig, timeout=120) -> tuple[subprocess.Popen, str]:
    """Start a training command, send `sig` once step 2 is logged; returns (finished process, its output)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    log = []
    for line in proc.stdout:  # wait until training is under way
        log.append(line)
        if line.startswith("step 0000002"):
            proc.send_signal(sig)
            break
    return proc, "".join(log) + proc.communicate(timeout=timeout)[0]


def assert_state_dicts_equal(a: dict, b: dict, what: str):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}[{k}] differs: max |diff| {(a[k] - b[k]).abs().max()}"


# --- unit tests of the small pieces ---------------------------------------------------------------------------------

def test_ema_starts_as_exact_fp32_copy_and_moves_towards_model():
    model = torch.nn.Linear(5, 3).to(torch.bfloat16)
    ema = EMA(model, decay=0.9)
    for p, e in zip(model.parameters(), ema.module.parameters()):
        assert e.dtype == torch.float32 and torch.equal(e, p.float()) and not e.requires_grad
    before = [e.clone() for e in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model, step=1000)
    for b, e, p in zip(before, ema.module.parameters(), model.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p.float())


def test_ema_warmup_decay_and_bad_decay():
    ema = EMA(torch.nn.Linear(2, 2), decay=0.9999, warmup=True)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10**7) == 0.9999
    assert EMA(torch.nn.Linear(2, 2), decay=0.9999).decay_at(0) == 0.9999
    with pytest.raises(ValueError, match="decay"):
        EMA(torch.nn.Linear(2, 2), decay=1.0)


def test_lr_warmup_then_constant(tmp_path):
    args = tiny_args(tmp_path, "--lr", "1e-3", "--warmup-steps", "4")
    assert [lr_at(args, s) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert lr_at(tiny_args(tmp_path, "--warmup-steps", "0"), 0) == pytest.approx(1e-3)


def test_train_state_round_trip_and_rng_capture():
    state = TrainState(step=7, images_seen=28, epoch=1, batch_in_epoch=2, best_metric=0.5, best_step=4)
    assert TrainState.from_dict(state.to_dict()) == state
    import random
    import numpy as np
    saved = capture_rng()
    first = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng(saved)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def test_cuda_rng_is_this_devices_only_and_old_lists_still_load(monkeypatch):
    """A checkpoint holds the CUDA RNG of this rank's device, so resuming with fewer visible GPUs cannot index past
    them; a per-device list (early checkpoints) restores the current device's entry, or nothing if it has none."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: restored.append(s.tolist()))
    saved = capture_rng()
    assert saved["cuda"].tolist() == [7]
    restore_rng(saved)
    restore_rng(dict(saved, cuda=[torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)]))
    restore_rng(dict(saved, cuda=[torch.tensor([1], dtype=torch.uint8)]))  # device 1 absent: left alone
    assert restored == [[7], [2]]


def test_more_processes_than_gpus_on_a_node_is_refused(monkeypatch):
    from fcdm import distributed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(ValueError, match="LOCAL_RANK 3 but this node has 2 visible GPU"):
        distributed.init("auto")


def test_guard_counts_and_stops_after_consecutive_skips():
    state = TrainState()
    assert check_step(state, 1.0, 2.0, max_consecutive=3)
    assert not check_step(state, math.nan, 2.0, 3) and not check_step(state, 1.0, math.inf, 3)
    assert state.skipped_steps == 2 and state.consecutive_skips == 2
    assert check_step(state, 1.0, 1.0, 3) and state.consecutive_skips == 0
    for _ in range(2):
        check_step(state, math.nan, 1.0, 3)
    with pytest.raises(NonFiniteStepError, match="3 consecutive"):
        check_step(state, -math.inf, 1.0, 3)


def test_backend_comes_from_the_flag_else_fcdm_backend(tmp_path, monkeypatch):
    """Without --backend, train.py runs the FCDM_BACKEND backend and records it in the checkpoint."""
    from fcdm_kernels import dispatch
    monkeypatch.setattr(dispatch, "_global_backend", None)  # earlier in-process runs set one
    monkeypatch.setenv("FCDM_BACKEND", "torch")
    without_flag = [a for a in TINY if a not in ("--backend", "torch")]
    args = parse_args([*without_flag, "--results-dir", str(tmp_path), "--run-name", "run", "--max-train-steps", "1"])
    assert args.backend is None
    train(args)
    assert final_checkpoint(os.path.join(str(tmp_path), "run"))["args"]["backend"] == "torch"
    assert dispatch.get_backend() == "torch"
