#!/usr/bin/env bash
# Everything that needs a GPU, in one go (the device machine has torch but not Ray/MLflow):
# the CUDA tests, single-trial throughput + test-LL time, and many trials per GPU (separate
# processes, the batched trainer, and trial pools: what sweeps with fractional GPUs run).
# SKIP_TRAIN=1 skips the single-trial training figure, TRIALS= the process-concurrency one.
#   OUT=/some/dir bash benchmarks/gpu_suite.sh
set -u
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu_suite}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q tests/test_cuda.py tests/test_batched.py tests/test_priors.py tests/test_likelihoods.py \
    2>&1 | tail -25 | tee "$OUT/cuda_tests.log"
timeout 300 python3 benchmarks/throughput.py --device cuda --compile ${SKIP_TRAIN:+--skip-train} 2>&1 | tee "$OUT/throughput.jsonl"
[ -n "${TRIALS-1 8 32}" ] && timeout 300 python3 benchmarks/concurrency.py --trials ${TRIALS-1 8 32} --epochs 2 2>&1 | tee "$OUT/concurrency.jsonl"
timeout 300 python3 benchmarks/batched.py --device cuda --models 1 8 32 --precision fp32 tf32 2>&1 | tee "$OUT/batched.jsonl"
timeout 300 python3 benchmarks/pool.py --device cuda --models 1 8 32 64 2>&1 | tee "$OUT/pool.jsonl"
