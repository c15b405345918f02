"""Regenerate official_golden.safetensors from the official FCDM code (run by hand, never by the tests).

    git clone https://github.com/star-kwon/FCDM /tmp/official      # outside this repository
    PYTHONPATH=. python tests/data/make_official_golden.py --official /tmp/official

It imports the official `models/fcdm_models.py` from that checkout (nothing of it is copied here), builds a
timestep embedder and a label embedder of width 16, a final layer of width 8 and a tiny FCDM (tests/golden.py's
MODEL_CONFIG), gives every parameter the fixed value of tests/golden.py (by official state-dict key), runs the fixed
inputs of tests/golden.py through them in fp32 on the CPU, and stores inputs, outputs, the official keys and shapes,
and where they came from. The official timestep embedder computes its frequencies in fp32 whatever the weights'
dtype, so the whole official model cannot run in fp64; its fp32 outputs are the golden values.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests import golden  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", required=True, type=Path, help="a checkout of star-kwon/FCDM")
    p.add_argument("--out", type=Path, default=golden.GOLDEN_FILE)
    args = p.parse_args(argv)
    sys.path.insert(0, str(args.official))
    from models import fcdm_models as official  # noqa: E402  (the official code, from its checkout)

    torch.manual_seed(0)  # module construction draws initial weights; all are replaced below
    modules = {
        "t_embedder": official.TimestepEmbedder(golden.EMBED_WIDTH),
        "y_embedder": official.LabelEmbedder(golden.NUM_CLASSES, golden.EMBED_WIDTH, 0.1),
        "final_layer": official.ConvFinalLayer(golden.FINAL_WIDTH, golden.FINAL_WIDTH),
        "model": official.FCDM(**{k: list(v) if isinstance(v, tuple) else v for k, v in golden.MODEL_CONFIG.items()}),
    }
    shapes = {}
    for name, module in modules.items():
        shapes[name] = {k: list(v.shape) for k, v in module.state_dict().items()}
        module.load_state_dict(golden.state_dict(name + ".", shapes[name]), strict=True)
        module.eval()

    x = golden.inputs()
    with torch.no_grad():
        out = {
            "t_embedder.frequencies": modules["t_embedder"].timestep_embedding(x["t_embedder.t"], 256),
            "t_embedder.out": modules["t_embedder"](x["t_embedder.t"]),
            "y_embedder.out": modules["y_embedder"](x["y_embedder.labels"], False),
            "y_embedder.dropped": modules["y_embedder"](x["y_embedder.labels"], False,
                                                        torch.ones_like(x["y_embedder.labels"])),
            "final_layer.out": modules["final_layer"](x["final_layer.x"], x["final_layer.c"]),
            "model.out": modules["model"](x["model.x"], x["model.t"], x["model.y"]),
        }
    commit = subprocess.run(["git", "-C", str(args.official), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    metadata = {"source": f"github.com/star-kwon/FCDM@{commit}", "generated": datetime.date.today().isoformat(),
                "torch": torch.__version__, "dtype": "float32", "device": "cpu", "shapes": json.dumps(shapes)}
    tensors = {k: v.contiguous() for k, v in {**x, **out}.items()}
    save_file(tensors, str(args.out), metadata=metadata)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes): {sorted(tensors)}; {metadata['source']}")


if __name__ == "__main__":
    main()
