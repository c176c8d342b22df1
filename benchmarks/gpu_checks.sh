#!/bin/bash
# The GPU checks of a release, in one command (run it alone on the machine: the timings need the CPUs too).
#   bash benchmarks/gpu_checks.sh [OUT_DIR]        (default runs/gpu_checks)
# 1. the GPU tests (pytest -m gpu; 8 workers with pytest-xdist, which spreads the kernels' compilation)
# 2. benchmarks/kernels.py --profile: kernels vs fla's DeltaNet, per-kernel times; --gated: vs fla's Gated DeltaNet
# 3. benchmarks/model_throughput.py --packed-docs 2000 --profile: model throughput on dense rows and packed documents
# Each step has a time limit (seconds: TESTS_S, KERNELS_S, GATED_S, MODEL_S); logs go to OUT_DIR, the summary to stdout.
set -u
out=${1:-runs/gpu_checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
workers=$(python -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")

timeout "${TESTS_S:-420}" python -m pytest -m gpu $workers -p no:cacheprovider -rf tests > "$out/tests.log" 2>&1
echo "tests: exit $? ($(tail -n 1 "$out/tests.log"))"
timeout "${KERNELS_S:-240}" python benchmarks/kernels.py --profile > "$out/kernels.log" 2>&1
echo "kernels benchmark: exit $?"
grep "^|" "$out/kernels.log"
timeout "${GATED_S:-180}" python benchmarks/kernels.py --gated --shapes 8,4096,16,128 2,16384,16,128 1,32768,8,128 \
  > "$out/kernels_gated.log" 2>&1
echo "gated kernels benchmark: exit $?"
grep "^|" "$out/kernels_gated.log"
timeout "${MODEL_S:-240}" python benchmarks/model_throughput.py --packed-docs 2000 --profile > "$out/throughput.log" 2>&1
echo "model throughput: exit $?"
tail -n 6 "$out/throughput.log"
