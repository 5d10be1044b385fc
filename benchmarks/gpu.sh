#!/usr/bin/env bash
# The GPU check, in one go, for the day a GPU is lent (~8 minutes on one H100/H200-class GPU):
#   1. the GPU smoke suite (tests/test_gpu.py): every stage a few steps in bf16-mixed, eager and compiled; KV-cache
#      decoding against the full forward; FSDP on one device; flash SDPA and FlexAttention paths;
#   2. pretraining tokens/s and MFU (against the matmul peak measured on that GPU) for model=small and
#      model=medium in bf16-mixed, eager and compiled, and the activation memory of gradient checkpointing;
#   3. decoding tokens/s (fp32/bf16, eager/compiled) and its memory-bandwidth limit.
# Run from the repository root: bash benchmarks/gpu.sh [python]. Tables go to stdout, JSON to outputs/bench/gpu/.
set -euo pipefail
PY=${1:-${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}}
OUT=${BENCH_OUT:-outputs/bench/gpu}
export MINILLM_EXPECT_GPU=1 PYTHONUNBUFFERED=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), torch.__version__)"
"$PY" -m minillm.data.builtin
status=0  # a failing smoke test still leaves the device time to the benchmarks; the exit code reports it
"$PY" -m pytest -q -m gpu -p no:cacheprovider || status=1
"$PY" -m benchmarks.train_throughput --device cuda --presets small medium --stages pretrain \
    --precisions bf16-mixed --compile off on --steps 30 --warmup 10 --no-bare --out-dir "$OUT"
"$PY" -m benchmarks.train_throughput --device cuda --presets medium --stages pretrain --precisions bf16-mixed \
    --compile off --checkpointing off on --steps 12 --warmup 6 --out-dir "$OUT/checkpointing"
"$PY" -m benchmarks.generation --device cuda --batches 1 8 --out-dir "$OUT"
exit $status
