"""benchmarks/sampler_nfe.py runs end to end on a tiny random demo-shaped model: every sampler row, the plot, the
JSON and the precision check (the numbers themselves are measured by hand; docs/sampling.md has them)."""
import json

import torch

from benchmarks import sampler_nfe

from .test_load import random_fcdm


def test_sampler_nfe_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FCDM_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = random_fcdm(num_classes=10, in_channels=3)
    args = dict(model="FCDM-T", image_size=8, num_classes=10, in_channels=3, objective="ddpm", vae=None)
    torch.save({"ema": model.state_dict(), "args": args}, tmp_path / "demo.pt")
    common = [str(tmp_path / "demo.pt"), "--num-samples", "10", "--bootstrap", "2", "--classifier-steps", "5",
              "--out", str(tmp_path / "nfe")]
    sampler_nfe.main(common + ["--max-nfe", "10"])
    result = json.loads((tmp_path / "nfe.json").read_text())
    assert [(r["sampler"], r["nfe"]) for r in result["rows"]] == [(run[0], 10) for run in sampler_nfe.RUNS.values()]
    assert all(0 <= r["class_accuracy"] <= 1 and r["fd"] >= 0 for r in result["rows"])
    assert (tmp_path / "nfe.png").stat().st_size > 1000 and "| DDPM (in-house) | 10 |" in capsys.readouterr().out
    sampler_nfe.main(common + ["--max-nfe", "10", "--samplers", "ddim", "--append"])
    rows = json.loads((tmp_path / "nfe.json").read_text())["rows"]
    assert len(rows) == len(sampler_nfe.RUNS) + 1
    assert all(rows[-1][k] == rows[1][k] for k in ("sampler", "nfe", "class_accuracy", "fd"))
    sampler_nfe.main(common + ["--precision", "--precision-samples", "4"])
    precision = json.loads((tmp_path / "nfe_precision.json").read_text())["precision"]
    assert [r["nfe"] for r in precision] == [250, 20] and all(r["rel_l2_batch"] > 0 for r in precision)
