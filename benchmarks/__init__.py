"""Benchmarks of fcdm: fused ops against eager and compiled baselines, whole-model throughput, and the GPU check.

    python -m benchmarks.ops --quick            # op table, appended to benchmarks/results/ops.jsonl
    python -m benchmarks.model --model FCDM-XL --batch 64 --res 256 --mode train
    bash benchmarks/gpu_check.sh                # everything, at reduced repetitions, in one device call
"""
