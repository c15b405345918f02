#!/usr/bin/env bash
# fcdm GPU check, in one device call: install and build, `pytest -m "gpu and not slow"`, every GEMM config the Triton
# tuner may pick against fp64 (`-m gemm_candidates`), the op and model benchmarks at reduced repetitions, a kernel
# profile of the block, the chart, and the summary table (printed last).
#
#   bash benchmarks/gpu_check.sh
#
# Results and logs go to $OUT/gpu_check/ when $OUT is set, else benchmarks/results/gpu_check/.
# Budget: GPU_CHECK_BUDGET_S seconds in all (default 340, under 6 minutes on an H100). Each stage runs under
# `timeout` with the smaller of its own cap and what the budget can spare after keeping the minimum that the later
# stages need, so one hang cannot eat the rest, and a failed stage never stops the next one.
# Without CUDA it still runs end to end (tiny shapes, CPU timer) as a dry run; GPU_CHECK_SKIP_INSTALL=1 skips pip.
set -uo pipefail  # no -e: every stage runs and reports whatever happened before it

cd "$(dirname "${BASH_SOURCE[0]}")/.."
START=$(date +%s)
BUDGET_S=${GPU_CHECK_BUDGET_S:-340}
RESULTS=${OUT:+$OUT/gpu_check}
RESULTS=${RESULTS:-benchmarks/results/gpu_check}
mkdir -p "$RESULTS"
STAGES="$RESULTS/stages.tsv"
: > "$STAGES"
PY=${PYTHON:-python}

export FCDM_BENCH_RUN_ID=${FCDM_BENCH_RUN_ID:-gpucheck-$(date -u +%Y%m%dT%H%M%SZ)}
export FCDM_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1
if [ -z "${FCDM_GIT_COMMIT:-}" ] && git rev-parse --git-dir >/dev/null 2>&1; then
  FCDM_GIT_COMMIT=$(git rev-parse --short=12 HEAD) && export FCDM_GIT_COMMIT
fi

# stage NAME CAP_S RESERVE_S CMD...: run CMD for at most min(CAP_S, budget left - RESERVE_S) seconds, where
# RESERVE_S is what the later stages need at least; log to $RESULTS/NAME.log and record (name, exit code, seconds).
stage() {
  local name=$1 cap=$2 reserve=$3
  shift 3
  local left limit t0 rc
  left=$(( BUDGET_S - ($(date +%s) - START) - reserve ))
  limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 5 ]; then
    echo "== $name: skipped, the budget is spent"
    printf '%s\t%s\t%s\n' "$name" skipped 0 >> "$STAGES"
    return
  fi
  echo "== $name (limit ${limit}s): $*"
  t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
  rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$STAGES"
  echo "== $name: exit $rc after $(( $(date +%s) - t0 ))s"
}

# The third argument keeps the later stages' minimums: pytest 40, gemm_candidates 30, ops 50, model 90, profile 10,
# chart 10, summary 15.
stage env 20 245 "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA')"
if [ "${GPU_CHECK_SKIP_INSTALL:-0}" != 1 ]; then
  stage install 150 245 "$PY" -m pip install --no-deps --no-build-isolation --no-input -e .
fi
HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
SUITE=$([ "$HAS_CUDA" = 1 ] && echo quick || echo tiny)
stage pytest_gpu 110 205 env FCDM_TRITON_TUNE=0 "$PY" -m pytest -m "gpu and not slow and not gemm_candidates" -q \
  -p no:cacheprovider --durations=15 -rfE
# Tuning picks any candidate in production; the stage above runs the first one only.
stage gemm_candidates 60 175 "$PY" -m pytest -m gemm_candidates -q -p no:cacheprovider --durations=6 -rfE
stage ops 80 125 "$PY" -m benchmarks.ops --quick --results-dir "$RESULTS"
stage model 140 35 "$PY" -m benchmarks.model --suite "$SUITE" --results-dir "$RESULTS"
stage profile 30 25 "$PY" -m benchmarks.kernel_profile --op block --mode full --providers channels_last,triton,cuda \
  --results-dir "$RESULTS"
stage chart 20 15 "$PY" -m benchmarks.chart --results-dir "$RESULTS"

echo "== results, logs and chart: $RESULTS (run $FCDM_BENCH_RUN_ID, $(( $(date +%s) - START ))s so far)"
timeout --kill-after=5 20 "$PY" -m benchmarks.summary --results-dir "$RESULTS" --stages "$STAGES"
