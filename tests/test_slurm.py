"""Jobs that srun starts (no torchrun): rank, world size, local rank and the rendezvous from SLURM's variables, and
SIGUSR1 (SLURM's warning before a time limit) saving a checkpoint and requeueing the job."""
import os
import signal
import stat
import sys

import pytest

from fcdm import distributed
from fcdm.train import resume as ckpt_io
from fcdm.train.guards import StopRequest, requeue_on_slurm

from .test_train_common import REPO, TINY, run_train, signal_mid_run, slow_loader_path


def test_placement_prefers_torchrun_then_slurm_then_a_single_process():
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
    assert distributed.placement(slurm) == (5, 8, 1, "slurm")
    assert distributed.placement({**slurm, "SLURM_STEP_NUM_TASKS": "4"}) == (5, 4, 1, "slurm")  # this srun's tasks
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}
    assert distributed.placement({**slurm, **torchrun}) == (3, 4, 3, "torchrun")  # torchrun inside an sbatch job
    assert distributed.placement({}) == (0, 1, 0, "single")
    assert distributed.placement({"SLURM_JOB_ID": "7"}) == (0, 1, 0, "single")   # sbatch without srun


@pytest.mark.parametrize("nodelist,hosts", [
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu7", ["gpu7"]),
    ("a[8-10],b1", ["a8", "a9", "a10", "b1"]),
    ("r[1-2]n[09-10]", ["r1n09", "r1n10", "r2n09", "r2n10"]),
    ("x-[001-002].cluster", ["x-001.cluster", "x-002.cluster"]),
])
def test_nodelist_expansion(nodelist, hosts):
    assert distributed.expand_nodelist(nodelist) == hosts


def _fake_scontrol(tmp_path, script: str) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / "scontrol"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(bin_dir)


def test_rendezvous_from_the_node_list_with_and_without_scontrol(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    env = {"SLURM_JOB_NODELIST": "node[04-05]", "SLURM_JOB_ID": "123456"}
    distributed.slurm_rendezvous(env)
    assert env["MASTER_ADDR"] == "node04" and env["MASTER_PORT"] == str(20000 + 123456 % 20000)
    env = {"SLURM_JOB_NODELIST": "node[04-05]", "SLURM_STEP_NODELIST": "node05", "MASTER_PORT": "999"}
    distributed.slurm_rendezvous(env)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("node05", "999")  # the step's nodes; explicit port kept
    monkeypatch.setenv("PATH", _fake_scontrol(tmp_path, 'echo "head-$3"; echo other\n'))
    env = {"SLURM_JOB_NODELIST": "weird[1-2]"}
    distributed.slurm_rendezvous(env)
    assert env["MASTER_ADDR"] == "head-weird[1-2]"  # what scontrol show hostnames says wins
    with pytest.raises(ValueError, match="set MASTER_ADDR"):
        distributed.slurm_rendezvous({})


def test_sigusr1_is_a_stop_request_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_requeue_only_after_sigusr1_inside_a_slurm_job(tmp_path, monkeypatch):
    calls = tmp_path / "calls"
    monkeypatch.setenv("PATH", _fake_scontrol(tmp_path, f'echo "$@" >> {calls}\n'))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert not requeue_on_slurm("SIGTERM", True, print) and not requeue_on_slurm("SIGUSR1", False, print)
    assert requeue_on_slurm("SIGUSR1", True, print)
    assert calls.read_text() == "requeue 77\n"
    monkeypatch.delenv("SLURM_JOB_ID")
    assert not requeue_on_slurm("SIGUSR1", True, print)


def test_sigusr1_saves_requeues_and_resume_auto_finishes(tmp_path):
    calls = tmp_path / "calls"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{slow_loader_path(tmp_path)}{os.pathsep}{REPO}",
           "SLURM_JOB_ID": "4242",
           "PATH": _fake_scontrol(tmp_path, f'echo "$@" >> {calls}\n') + os.pathsep + os.environ["PATH"]}
    flags = [*TINY, "--results-dir", str(tmp_path), "--run-name", "run", "--ckpt-every", "100"]
    proc, out = signal_mid_run([sys.executable, os.path.join(REPO, "train.py"), *flags, "--max-train-steps", "1000"],
                               env, signal.SIGUSR1)
    assert proc.returncode == 0, out
    assert "SIGUSR1" in out and "requeued SLURM job 4242" in out, out
    assert calls.read_text() == "requeue 4242\n"
    steps = [s for s, _ in ckpt_io.list_checkpoints(os.path.join(tmp_path, "run", "checkpoints"))]
    assert len(steps) == 1 and 2 <= steps[0] < 100, out
    state, _ = run_train(tmp_path, "--max-train-steps", str(steps[0] + 2), "--resume", "auto")
    assert state.step == steps[0] + 2
