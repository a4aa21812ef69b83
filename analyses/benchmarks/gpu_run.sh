#!/bin/bash
# One GPU session, sized for about 8 minutes: the tiny-model exactness tests on the device (float32,
# then the half-precision ones), then the scaling benchmark of a configuration with random weights at
# the paper's lengths. Everything it writes goes under $OUT (default runs/gpu), one log per step.
#
#   OUT=... bash analyses/benchmarks/gpu_run.sh
#
# Settings (environment): PYTHON (default .venv/bin/python, else python3), DEVICE (cuda), CONFIG
# (llama-3.1-8b), DTYPE (bfloat16), LENGTHS (4096,16384,32768), TESTS_SECONDS (180), BENCH_SECONDS (300).
# The same script checked on a CPU with a tiny configuration (tests/test_scale.py runs it so):
#
#   DEVICE=cpu CONFIG=tiny-llama DTYPE=float32 LENGTHS=256,512 OUT=/tmp/gpu bash analyses/benchmarks/gpu_run.sh
set -u
OUT=${OUT:-runs/gpu}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEVICE=${DEVICE:-cuda}
CONFIG=${CONFIG:-llama-3.1-8b}
DTYPE=${DTYPE:-bfloat16}
LENGTHS=${LENGTHS:-4096,16384,32768}
mkdir -p "$OUT"
{
  echo "device: $DEVICE; config: $CONFIG; dtype: $DTYPE; lengths: $LENGTHS"
  "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  if [ "${DEVICE%%:*}" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
} > "$OUT/device.txt" 2>&1
FORWARD_INFLUENCE_TEST_DEVICE=$DEVICE timeout "${TESTS_SECONDS:-180}" "$PYTHON" -m pytest -q -p no:cacheprovider \
  -m "not slow" tests/test_eviction.py tests/test_runtime.py tests/test_half_precision.py > "$OUT/tests.log" 2>&1
echo "tests: exit $?" >> "$OUT/device.txt"
timeout "${BENCH_SECONDS:-300}" "$PYTHON" analyses/benchmarks/bench_scale.py --config "$CONFIG" --device "$DEVICE" \
  --dtype "$DTYPE" --lengths "$LENGTHS" --out "$OUT" > "$OUT/bench.log" 2>&1
echo "benchmark: exit $?" >> "$OUT/device.txt"
cat "$OUT/device.txt"
