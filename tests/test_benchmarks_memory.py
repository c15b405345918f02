"""The training-memory predictor (benchmarks/memory.py): exact byte counts for what is known in closed form, the
fused block's smaller activations, and the CLI."""
import json
import os

import pytest
import torch

from benchmarks import memory
from fcdm.models import FCDM_models

pytest.importorskip("triton")


def _param_stats(model_name: str):
    model = FCDM_models[model_name]()
    return sum(p.numel() for p in model.parameters()), len(list(model.parameters()))


@pytest.mark.parametrize("variant", ["reference", "fused"])
def test_states_are_counted_exactly(variant):
    """fp32 weights, AdamW's two fp32 moments plus its fp32 step counter per tensor, and the fp32 EMA copy."""
    numel, tensors = _param_stats("FCDM-T")
    before = os.environ.get("TRITON_INTERPRET")
    got = memory.predict_train_step(variant, "FCDM-T", batch=2, res=64)
    assert os.environ.get("TRITON_INTERPRET") == before  # the trace leaves the environment as it found it
    assert got["params"] == 4 * numel
    assert got["ema"] == 4 * numel
    assert got["adamw"] == 8 * numel + 4 * tensors
    assert got["activations"] > 0
    assert got["total"] == sum(v for k, v in got.items() if k != "total")


def test_fused_block_saves_less_than_the_reference():
    """The fused block saves x and the pre-activation only (8C bytes per pixel in bf16); the reference keeps every
    intermediate of the block, so its activations must be several times larger at the same shape."""
    reference = memory.predict_train_step("reference", "FCDM-T", batch=4, res=128)
    fused = memory.predict_train_step("fused", "FCDM-T", batch=4, res=128)
    assert fused["params"] == reference["params"]
    assert 2 * fused["activations"] < reference["activations"]
    assert fused["total"] < reference["total"]


def test_grad_checkpointing_lowers_the_reference_activations():
    full = memory.predict_train_step("reference", "FCDM-T", batch=4, res=128)
    checkpointed = memory.predict_train_step("reference", "FCDM-T", batch=4, res=128, grad_checkpointing=True)
    assert checkpointed["activations"] < full["activations"]


def test_copy_traffic_counts_bytes_written_by_kind():
    x = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)
    with memory.CopyTraffic() as traffic:
        x.float()                                        # a cast: 256 fp32 values
        x.clone()                                        # a layout copy: 256 bf16 values
        x.permute(0, 2, 3, 1).contiguous()               # another
        torch.cat([x, x])                                # 512 bf16 values
        torch.nn.functional.pixel_shuffle(x, 2)          # 256 bf16 values
        x + 1                                            # not a copy
    assert traffic.bytes == {"casts": 1024, "layout": 1024, "concat": 1024, "shuffle": 512}


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="variant"):
        memory.predict_train_step("fast", "FCDM-T", 2, 64)
    with pytest.raises(ValueError, match="model"):
        memory.predict_train_step("fused", "FCDM-Q", 2, 64)
    with pytest.raises(ValueError, match="res"):
        memory.predict_train_step("fused", "FCDM-T", 2, 60)


def test_cli_writes_one_row_per_variant(tmp_path, capsys):
    assert memory.main(["--suite", "tiny", "--variants", "fused,dit", "--results-dir", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "memory.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["fused", "dit"]
    for r in rows:
        assert r["status"] == "ok" and r["model"] == "FCDM-T" and r["bench"] == "memory"
        parts = sum(r[f"{k}_gib"] for k in ("params", "buffers", "grads", "adamw", "ema", "activations",
                                            "temporaries"))
        assert r["predicted_gib"] == pytest.approx(parts)
        assert r["copies_casts_gib"] > 0 and all(r[f"copies_{k}_gib"] >= 0 for k in memory.CopyTraffic.KINDS)
    assert "predicted peak" in capsys.readouterr().out
    for bad in (["--variants", "fast"], ["--res", "100"], ["--batch", "0"]):
        with pytest.raises(SystemExit):
            memory.main(bad + ["--no-write"])
