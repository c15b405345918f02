"""fcdm/flags.py: the flags the programs share parse alike everywhere, and the value checks refuse what they should."""
import argparse

import pytest

from fcdm import flags
from fcdm.data.extract import parse_args as extract_args
from fcdm.train.config import build_parser as train_parser
from fcdm_kernels.dispatch import BACKENDS


def one_flag(add, *argv, **kwargs):
    parser = argparse.ArgumentParser(exit_on_error=False)
    add(parser, **kwargs)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("check,good,bad", [
    (flags.positive(float), ["1e-4", "3"], ["0", "-1", "nan", "inf"]),
    (flags.positive(int), ["1", "7"], ["0", "-2"]),
    (flags.non_negative(float), ["0", "2.5"], ["-0.1", "nan", "-inf"]),
    (flags.unit_interval(), ["0", "1", "0.5"], ["1.01", "-0.1", "nan"]),
    (flags.unit_interval(include_one=False), ["0", "0.9999"], ["1", "2"]),
])
def test_value_checks(check, good, bad):
    for text in good:
        assert check(text) == float(text)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=f"got {text}"):
            check(text)


def test_existing_file(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"x")
    assert flags.existing_file(str(tmp_path / "ckpt.pt")) == str(tmp_path / "ckpt.pt")
    with pytest.raises(argparse.ArgumentTypeError, match="does not exist or is not a file"):
        flags.existing_file(str(tmp_path))


def test_switches_take_no_stray_value():
    assert one_flag(flags.add_switch, "--no-bf16", flag="--bf16", default=True, help="").bf16 is False
    with pytest.raises(SystemExit):  # "unrecognized arguments: False"
        one_flag(flags.add_switch, "--bf16", "False", flag="--bf16", default=True, help="")


def test_the_shared_flags_are_the_same_in_every_program(tmp_path):
    vae = one_flag(flags.add_vae_flags, "--hf-model-dir", "x", "--vae-scaling-factor", "0.5", default=None, help="",
                   scale_default=None, scale_help="")
    assert (vae.vae, vae.vae_scaling_factor) == ("x", 0.5)
    train = train_parser().parse_args(["--backend", "triton", "--device", "cpu", "--hf-model-name", "v"])
    extract = extract_args(["--data-path", str(tmp_path), "--output", str(tmp_path / "out"), "--device", "cpu",
                            "--hf-model-dir", "v"])
    assert (train.backend, train.device, train.vae) == ("triton", "cpu", "v") == ("triton", extract.device, extract.vae)
    backend = next(a for a in train_parser()._actions if a.dest == "backend")
    assert tuple(backend.choices) == BACKENDS and set(flags.DEVICES) == {"auto", "cpu", "cuda"}


def test_cuda_without_a_gpu_is_refused_at_once(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert one_flag(flags.add_device_flag, "--device", "cpu").device == "cpu"
    with pytest.raises(argparse.ArgumentError, match="--device: cuda was asked for, but no CUDA GPU is visible"):
        one_flag(flags.add_device_flag, "--device", "cuda")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert one_flag(flags.add_device_flag, "--device", "cuda").device == "cuda"
