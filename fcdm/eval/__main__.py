"""`python -m fcdm.eval --sample-batch samples.npz --ref-batch VIRTUAL_imagenet256_labeled.npz [--out r.json]`.

Prints the ADM evaluator's Inception Score, FID, sFID, precision and recall as JSON on stdout (progress on stderr)
and writes the same JSON to --out when given.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from fcdm.eval.evaluate import evaluate, open_inputs
from fcdm.eval.features import InceptionFeatureExtractor, InceptionWeightsMissing
from fcdm.eval.metrics import FID_METHODS


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fcdm.eval",
        description="Inception Score, FID, sFID, precision and recall of an ADM .npz sample batch against a reference "
                    "batch, with the ADM evaluator's definitions, in PyTorch. See docs/evaluation.md.")
    parser.add_argument("--sample-batch", required=True,
                        help="ADM .npz of generated images: arr_0 uint8 (N, H, W, 3)")
    parser.add_argument("--ref-batch", required=True,
                        help="ADM reference .npz: arr_0 images and/or precomputed mu, sigma, mu_s, sigma_s")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    parser.add_argument("--inception-weights", default=None,
                        help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth; default: torch.hub cache")
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="images per Inception forward")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--fid-method", choices=FID_METHODS, default="sqrtm",
                        help="sqrtm: scipy.linalg.sqrtm as in ADM (default); eigh: same value, much faster")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(),
                        help="progress bars on stderr (default: when stderr is a terminal)")
    return parser


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device) if args.device else None
    except RuntimeError as err:
        parser.error(f"--device: {err}")
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available in this torch build / machine")
    try:
        inputs = open_inputs(args.sample_batch, args.ref_batch)
        extractor = InceptionFeatureExtractor(args.inception_weights, device=device)
        result = evaluate(inputs, extractor, batch_size=args.batch_size,
                          fid_method=args.fid_method, progress=args.progress)
    except (ValueError, InceptionWeightsMissing, ImportError) as err:
        parser.error(str(err))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as stream:
            stream.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
