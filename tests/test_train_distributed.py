"""Multi-process training on CPU (gloo): DDP equals one process with the same global batch; FSDP2 trains too."""
import os

import pytest
import torch

import fcdm.train.loop as loop
from fcdm.distributed import DistInfo

from .test_train_common import TINY, final_checkpoint, read_metrics, run_script, run_train

# Label dropout on: like timesteps, noise and data order, it is drawn on the global batch, so 1 and 2 processes see
# the same training examples.
SAME = ["--max-train-steps", "4", "--class-dropout-prob", "0.5", "--cfg-scale", "1", "--global-batch-size", "8",
        "--grad-accum", "1"]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    _, run_dir = run_train(tmp_path_factory.mktemp("single"), *SAME)
    return final_checkpoint(run_dir), read_metrics(run_dir)


def _torchrun(tmp_path, *extra):
    res = run_script([*TINY, "--results-dir", tmp_path, "--run-name", "run", *SAME, *extra], torchrun_procs=2,
                     timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run_dir = os.path.join(tmp_path, "run")
    return final_checkpoint(run_dir), read_metrics(run_dir), res.stdout + res.stderr


def _assert_same_training(ckpt, metrics, reference, ref_metrics):
    losses = [m["loss"] for m in metrics if "loss" in m]
    ref_losses = [m["loss"] for m in ref_metrics if "loss" in m]
    assert len(losses) == len(ref_losses) == 4
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    for key in ("model", "ema"):
        for name, ref in reference[key].items():
            torch.testing.assert_close(ckpt[key][name], ref, rtol=1e-4, atol=2e-6, msg=f"{key}[{name}]")


def test_two_process_ddp_equals_one_process(tmp_path, single_process):
    ckpt, metrics, out = _torchrun(tmp_path)
    assert "world size 2" in out and "2 x 4 x 1" in out and "DDP" in out
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    _assert_same_training(ckpt, metrics, *single_process)


def test_two_process_fsdp2_trains_and_saves_full_weights(tmp_path, single_process):
    # A sample grid after step 2 runs the sharded EMA forward mid-run; its updates in steps 3 and 4 must still work.
    ckpt, metrics, out = _torchrun(tmp_path, "--fsdp", "--sample-every", "2")
    assert "FSDP2" in out
    # A full (unsharded) state dict with plain keys: loads into an unwrapped model, as sample.py does.
    reference, ref_metrics = single_process
    assert ckpt["model"].keys() == reference["model"].keys()
    _assert_same_training(ckpt, metrics, reference, ref_metrics)


def test_two_process_fsdp2_with_gradient_accumulation_equals_one_process(tmp_path):
    # Two micro-batches per step (4 images each over all ranks): FSDP2 reduce-scatters once, after the second.
    _, run_dir = run_train(tmp_path / "single", *SAME, "--grad-accum", "2")
    ckpt, metrics, out = _torchrun(tmp_path / "fsdp", "--fsdp", "--grad-accum", "2")
    assert "2 x 2 x 2" in out
    _assert_same_training(ckpt, metrics, final_checkpoint(run_dir), read_metrics(run_dir))


def test_global_batch_that_does_not_split_is_refused_with_advice(tmp_path, monkeypatch):
    monkeypatch.setattr(loop.distributed, "init", lambda *a, **k: DistInfo(0, 3, 0, torch.device("cpu")))
    with pytest.raises(ValueError, match="does not split evenly over 3 processes .* use a multiple of 3"):
        run_train(tmp_path, "--global-batch-size", "8")


def test_two_processes_started_with_slurm_variables_train_like_torchrun(tmp_path, single_process):
    """What `srun --ntasks=2 python train.py` gives each task: SLURM's variables and no torchrun ones. The result
    equals one process, as torchrun's does (test_two_process_ddp_equals_one_process)."""
    import socket
    import subprocess
    import sys
    from .test_train_common import REPO
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    base.update(OMP_NUM_THREADS="1", SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="1",
                MASTER_PORT=str(port))
    cmd = [sys.executable, os.path.join(REPO, "train.py"), *TINY, "--results-dir", str(tmp_path), "--run-name",
           "run", *SAME]
    procs = [subprocess.Popen(cmd, env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)}, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "world size 2" in outs[0] and "DDP" in outs[0]
    run_dir = os.path.join(tmp_path, "run")
    ckpt = final_checkpoint(run_dir)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    _assert_same_training(ckpt, read_metrics(run_dir), *single_process)


def test_two_process_fsdp2_posthoc_ema_snapshots_equal_one_process(tmp_path):
    """The power-function EMAs are sharded like the model; their snapshots gather the full weights."""
    from fcdm.ema import list_snapshots
    posthoc = ["--posthoc-ema", "--posthoc-ema-every", "2", "--posthoc-ema-dtype", "fp32"]
    _, run_dir = run_train(tmp_path / "single", *SAME, *posthoc)
    _torchrun(tmp_path / "fsdp", "--fsdp", *posthoc)
    single, sharded = list_snapshots(run_dir), list_snapshots(os.path.join(tmp_path, "fsdp", "run"))
    assert [s[:2] for s in single] == [s[:2] for s in sharded] and len(single) == 4
    for (_, _, a), (_, _, b) in zip(single, sharded):
        a, b = torch.load(a, weights_only=True)["ema"], torch.load(b, weights_only=True)["ema"]
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=2e-6, msg=name)
