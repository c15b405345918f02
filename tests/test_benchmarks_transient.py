"""The benchmarks' view of the kernels' memory and reduction mode: each op's transient memory in benchmarks.memory,
and the triton_atomic provider, which must run the relaxed-atomic path in its forward and its backward alike."""
import json
import os

import pytest
import torch

from benchmarks import memory, providers
from benchmarks.providers import build, find_cases, mode_callable, setup

pytest.importorskip("triton")
from tests.test_determinism import reduction_modes_seen  # noqa: E402,F401  (a fixture)

OPS_AND_PHASES = {(op, phase) for op in ("dwconv_ln_modulate", "grn_mlp", "convnext_block")
                  for phase in ("forward", "backward")}


def test_transient_rows_cover_every_op_pass_and_level():
    rows = memory.transient_rows("FCDM-T", 2, 64, {})
    assert len(rows) == 18 and all(r["status"] == "ok" for r in rows)
    for level in (1, 2, 3):
        in_level = [r for r in rows if r["level"] == level]
        assert {(r["op"], r["phase"]) for r in in_level} == OPS_AND_PHASES
    side, C = 8, 32  # level 1 of FCDM-T at 64px: a 8x8 latent, 32 channels
    first = next(r for r in rows if r["level"] == 1)
    assert first["shape"] == f"2x{side}x{side}x{C}" and first["x_gib"] == 2 * side * side * C * 2 / 2 ** 30
    for r in rows:
        assert r["workspace_gib"] >= 0 and r["outputs_gib"] > 0 and r["launches"] >= 1
        assert r["workspace_vs_x"] == pytest.approx(r["workspace_gib"] / r["x_gib"])


def test_the_dwconv_backward_holds_little_besides_dh0_at_the_issue_shape():
    """FCDM-XL 512px B=256: level 1 is (256, 64, 64, 512); dh0 is one x, the partial sums a sliver of another."""
    rows = memory.transient_rows("FCDM-XL", 256, 512, {})
    backward = next(r for r in rows if r["level"] == 1 and r["op"] == "dwconv_ln_modulate" and r["phase"] == "backward")
    assert backward["shape"] == "256x64x64x512"
    assert 1.0 <= backward["workspace_vs_x"] <= 1.02


def test_cli_writes_the_transient_rows(tmp_path, capsys):
    assert memory.main(["--suite", "tiny", "--variants", "dit", "--results-dir", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "transient.jsonl").read_text().splitlines()]
    assert len(rows) == 18 and {r["bench"] for r in rows} == {"transient"}
    assert "transient memory" in capsys.readouterr().out


def test_triton_atomic_is_na_where_it_would_time_triton_again():
    assert "no atomic reductions" in providers.unavailable_reason("dwconv_ln_modulate", "triton_atomic", "cuda")
    assert "CUDA only" in providers.unavailable_reason("block", "triton_atomic", "cpu")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the kernels in the Triton interpreter")
@pytest.mark.parametrize("provider,atomic", [("triton_atomic", True), ("triton", False)])
def test_each_triton_provider_runs_its_own_reduction_mode_forward_and_backward(monkeypatch, reduction_modes_seen,
                                                                               provider, atomic):
    """Whatever FCDM_DETERMINISTIC says: the forward inside the provider and the backward that mode_callable times."""
    monkeypatch.setenv("FCDM_DETERMINISTIC", "1" if atomic else "0")
    monkeypatch.setattr(providers, "unavailable_reason", lambda op, provider, device: None)
    seen = reduction_modes_seen
    inputs = setup("block", find_cases(["tiny-L1"])[0], torch.float32, "cpu")
    run = build(inputs, provider)
    fn = mode_callable(run, "backward")
    seen.clear()  # the forward that mode_callable ran to get an output; what is timed is the backward
    fn()
    assert seen and all(a is atomic for a in seen)
