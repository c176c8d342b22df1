#!/bin/bash
# The GPU checks of a release, in one command (run it alone on the machine: the timings need the CPUs too).
#   bash benchmarks/gpu_checks.sh [OUT_DIR [STAGE ...]]      (default runs/gpu_checks, every stage)
# Stages:
#   tests       the operator, layer and model tests on the GPU (every test, not only the `gpu`-marked ones: on a CUDA
#               machine the kernels run for real; 8 workers with pytest-xdist, which spreads the compilation; the
#               gated kernel tests alone in one process first)
#   throughput  benchmarks/model_throughput.py: our model (eager, compiled) beside fla's DeltaNet model at the issue's
#               shapes in bf16, float32 + autocast at 8x2048, activation_checkpointing=selective, the batch-1 sweep
#   generation  benchmarks/generation.py: ms per generated token of every model (ours eager and graph, fla's DeltaNet,
#               a Llama), batch 1, 16 and 64, prompts of 128 and 2,048 tokens
#   kernels     benchmarks/kernels_vs_fla.py at the issue's seven shapes (four standard, three of low parallelism: the
#               bar is <= 1.0x fla at all of them), per-kernel profile of 1 x 32768 x 8 x 128; benchmarks/loss.py (the
#               language-modelling loss: ours fused and through PyTorch, the plain one, fla's fused cross-entropy)
#   gated       benchmarks/kernels_vs_fla.py --gated: gated EFLA / Gated DeltaNet vs fla's chunk_gated_delta_rule, and
#               model_throughput.py --decay-gate at 8x2048 beside fla's Gated DeltaNet model (not a default stage)
#   train       `efla train` at its defaults (340M, 8 x 2048, compiled blocks, bf16 autocast), 60 steps with a profile
#               of 3; needs TRAIN_DATA (.jsonl or folder, e.g. from scripts/build_corpus.py) and TOKENIZER (a folder,
#               e.g. from `efla tokenizer train`), carried to the machine (not a default stage)
#   host        benchmarks/host_overhead.py: host time per call of each operator, ours and fla's (not a default stage)
# On a machine with no network, carry fla's wheels (and transformers' if older there) and install them with
#   python3 -m pip install --no-index --no-deps --target DIR WHEELS... && export PYTHONPATH=DIR:$PWD/src
# without --no-index --no-deps pip tries to resolve dependencies over the network and can wait for minutes.
# fla autotunes its kernels on first use, minutes per stage on a fresh machine. This script sets
# TRITON_CACHE_AUTOTUNING=1 (Triton >= 3.4), so the winners are kept as small *.autotune.json files in TRITON_CACHE_DIR;
# carry those files from run to run (`cd $TRITON_CACHE_DIR && find . -name '*.autotune.json' | tar czf at.tgz -T -`,
# tens of KB for every stage; unpack into the next machine's TRITON_CACHE_DIR) and fla compiles only its winners.
# Each step has a time limit (seconds: TESTS_S, THROUGHPUT_S, GENERATION_S, KERNELS_S, LOSS_S, GATED_S, TRAIN_S,
# HOST_S);
# logs and JSON lines go to OUT_DIR, a summary to stdout. A stage that fails or runs out of time says so and the next one still runs.
set -u
out=${1:-runs/gpu_checks}
shift $(( $# > 0 ? 1 : 0 ))
stages=${*:-tests throughput generation kernels}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}
workers=$(python -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")

for stage in $stages; do
  case $stage in
    tests)
      # -vv (pyproject's addopts has -q): a line per test, so a run cut by its time limit still says what failed.
      # The gated kernel tests run alone in one process first: they wait minutes for fla's gated kernels to autotune.
      timeout "${TESTS_S:-480}" bash -c "
        python -m pytest -p no:xdist -p no:cacheprovider -vv -rf --durations=10 -m gpu tests/ops/test_triton_gated.py;
        python -m pytest $workers -p no:cacheprovider -vv -rf --durations=15 tests/ops tests/layers \
          tests/models/test_generation_static.py tests/models/test_convert.py tests/models/test_modeling.py \
          tests/models/test_compile_model.py \
          --ignore tests/ops/test_triton_gated.py" > "$out/tests.log" 2>&1
      echo "tests: exit $? ($(grep -cE ' PASSED' "$out/tests.log") passed)"
      grep -E "(FAILED|ERROR) tests" "$out/tests.log" | head -n 20 ;;
    throughput)
      mt="python benchmarks/model_throughput.py --out $out/throughput.jsonl"
      timeout "${THROUGHPUT_S:-420}" bash -c "
        $mt --variants efla fla --context-sweep --sweep-variants efla fla --sweep-max 262144 &&
        $mt --shapes 8x2048 --variants efla+compile --precisions bf16 amp &&
        $mt --shapes 8x2048 --variants efla fla --precisions amp &&
        $mt --shapes 8x2048 1x32768 --variants efla --activation-checkpointing selective" > "$out/throughput.log" 2>&1
      echo "model throughput: exit $?"
      grep -E "tokens/s|out of memory|longest" "$out/throughput.log" ;;
    generation)
      timeout "${GENERATION_S:-420}" python benchmarks/generation.py --new-tokens 32 --repeats 2 \
        --out "$out/generation.jsonl" > "$out/generation.log" 2>&1
      echo "generation: exit $?"
      tail -n 12 "$out/generation.log" ;;
    kernels)
      timeout "${KERNELS_S:-300}" python benchmarks/kernels_vs_fla.py --profile 4 > "$out/kernels.log" 2>&1
      echo "kernels benchmark: exit $?"
      grep "^|" "$out/kernels.log"
      timeout "${LOSS_S:-120}" python benchmarks/loss.py --out "$out/loss.jsonl" > "$out/loss.log" 2>&1
      echo "loss benchmark: exit $?"
      grep "^|" "$out/loss.log" ;;
    gated)
      timeout "${GATED_S:-360}" python benchmarks/kernels_vs_fla.py --gated --shapes 8,4096,16,128 2,16384,16,128 \
        32,1024,16,128 8,4096,32,64 1,32768,8,128 2,16384,8,128 > "$out/kernels_gated.log" 2>&1
      echo "gated kernels benchmark: exit $?"
      grep "^|" "$out/kernels_gated.log"
      timeout "${GATED_S:-200}" python benchmarks/model_throughput.py --decay-gate --shapes 8x2048 \
        --variants efla delta fla --out "$out/throughput_gated.jsonl" > "$out/throughput_gated.log" 2>&1
      echo "gated model throughput: exit $?"
      grep -E "tokens/s|out of memory" "$out/throughput_gated.log" ;;
    train)
      if [ -z "${TRAIN_DATA:-}" ] || [ -z "${TOKENIZER:-}" ]; then
        echo "train: set TRAIN_DATA and TOKENIZER (scripts/build_corpus.py, then efla tokenizer train)"; continue
      fi
      timeout "${TRAIN_S:-300}" python -m efla train --model 340M --tokenizer "$TOKENIZER" --data "$TRAIN_DATA" \
        --seq-len 2048 --micro-batch-size 8 --max-steps 60 --warmup-steps 10 --log-every 10 --profile-steps 3 \
        --out-dir "$out/train" > "$out/train.log" 2>&1
      echo "efla train: exit $? (tokens/s over each 10 steps; profile in $out/train/profile.txt)"
      grep -o '"step": [0-9]*\|"tokens_per_s": [0-9.]*\|"peak_gib": [0-9.]*' "$out/train/metrics.jsonl" | paste - - - ;;
    host)
      timeout "${HOST_S:-200}" python benchmarks/host_overhead.py --out "$out/host_overhead.jsonl" \
        > "$out/host_overhead.log" 2>&1
      echo "host overhead: exit $?"
      grep "^|" "$out/host_overhead.log" ;;
    *) echo "unknown stage $stage (tests, throughput, generation, kernels, gated, train, host)"; exit 2 ;;
  esac
done
