"""Checkpoint I/O: atomic writes survive SIGKILL, keep-last-K, newest-valid discovery, safe loading, compatibility."""
import argparse
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from fcdm.train import resume as ckpt_io

from .test_train_common import REPO


def _payload(step: int, size: int = 1000) -> dict:
    return {"model": {"w": torch.randn(size)}, "ema": {"w": torch.randn(size)}, "opt": {}, "args": {"model": "x"},
            "train_state": {"step": step}, "format": ckpt_io.FORMAT}


def test_atomic_save_round_trip_and_no_temporaries(tmp_path):
    payload = _payload(3)
    path = tmp_path / ckpt_io.checkpoint_name(3)
    ckpt_io.atomic_save(payload, str(path))
    assert os.listdir(tmp_path) == ["0000003.pt"]
    loaded = ckpt_io.load(str(path))
    assert torch.equal(loaded["model"]["w"], payload["model"]["w"]) and loaded["train_state"] == {"step": 3}


def test_sigkill_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    ckpt_io.atomic_save(_payload(1), str(ckpt_dir / "0000001.pt"))
    # The child writes a 40 MB checkpoint and announces when the bytes are on their way; fsync is slowed down so
    # the kill lands after the data is written but before the rename, the window a real crash can hit.
    child = textwrap.dedent(f"""
        import os, sys, time, torch
        from fcdm.train import resume as c
        real_fsync = os.fsync
        def slow_fsync(fd):
            print("writing", flush=True); time.sleep(30); real_fsync(fd)
        os.fsync = slow_fsync
        payload = {{"model": {{"w": torch.randn(10_000_000)}}, "ema": {{}}, "opt": {{}}, "args": {{}},
                   "train_state": {{"step": 2}}, "format": c.FORMAT}}
        c.atomic_save(payload, {str(ckpt_dir / "0000002.pt")!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (ckpt_dir / "0000002.pt").exists()          # the new file never appeared half-written
    leftovers = [f for f in os.listdir(ckpt_dir) if f != "0000001.pt"]
    assert leftovers and all(".tmp" in f for f in leftovers)   # only the abandoned temporary remains
    path, ckpt = ckpt_io.find_latest_valid(str(ckpt_dir), log=lambda msg: None)
    assert path.endswith("0000001.pt") and ckpt["train_state"]["step"] == 1


def test_find_latest_valid_skips_a_truncated_newest_file(tmp_path):
    for step in (1, 2):
        ckpt_io.atomic_save(_payload(step), str(tmp_path / ckpt_io.checkpoint_name(step)))
    with open(tmp_path / "0000003.pt", "wb") as f:  # e.g. copied by hand and cut short
        f.write(open(tmp_path / "0000002.pt", "rb").read()[:100])
    messages = []
    path, ckpt = ckpt_io.find_latest_valid(str(tmp_path), log=messages.append)
    assert path.endswith("0000002.pt") and ckpt["train_state"]["step"] == 2
    assert any("0000003.pt" in m for m in messages)
    assert ckpt_io.find_latest_valid(str(tmp_path / "empty"), log=print) is None


def test_keep_last_prunes_oldest_step_checkpoints_only(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt_io.atomic_save(_payload(step, 10), str(tmp_path / ckpt_io.checkpoint_name(step)))
    ckpt_io.atomic_save(_payload(2, 10), str(tmp_path / "best.pt"))
    ckpt_io.prune(str(tmp_path), keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["0000003.pt", "0000004.pt", "best.pt"]
    ckpt_io.prune(str(tmp_path), keep_last=0)
    assert len(os.listdir(tmp_path)) == 3


def test_load_refuses_code_and_reads_official_namespace_args(tmp_path):
    official = {"model": {"w": torch.ones(2)}, "ema": {"w": torch.ones(2)}, "opt": {},
                "args": argparse.Namespace(model="FCDM-XL", image_size=256)}
    torch.save(official, tmp_path / "official.pt")
    loaded = ckpt_io.load(str(tmp_path / "official.pt"))
    assert loaded["args"] == {"model": "FCDM-XL", "image_size": 256}

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"model": {}, "args": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        ckpt_io.load(str(tmp_path / "evil.pt"))
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an FCDM checkpoint"):
        ckpt_io.load(str(tmp_path / "other.pt"))


def test_incompatible_settings_are_listed():
    saved = {"model": "FCDM-T", "hidden_size": 32, "global_batch_size": 32, "lr": 1e-3}
    ckpt_io.check_compatible(saved, {**saved, "lr": 5e-4}, "x.pt")  # lr may change
    with pytest.raises(ValueError, match="hidden_size: checkpoint 32 vs now 64") as exc:
        ckpt_io.check_compatible(saved, {**saved, "hidden_size": 64, "global_batch_size": 16}, "x.pt")
    assert "global_batch_size" in str(exc.value)


def test_all_finite():
    assert ckpt_io.all_finite({"a": torch.randn(3), "step": torch.tensor(3)})
    assert not ckpt_io.all_finite({"a": torch.tensor([1.0, float("nan")])})
