#!/usr/bin/env bash
# One device-tool call, under 8 minutes on an H100: CUDA test-suite, validate fp32/bf16/fp16, the bench at
# 4k/16k/64k against eager, torch.compile and Inf-CL, overhead and the dense/fused crossover, and the registers /
# shared memory the driver reports per launched kernel next to the static table (benchmarks/results/triton_aot.md).
# Logs land in $OUT; copy the tables into benchmarks/RESULTS.md with the device, date, command and commit.
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_session.sh
# STEPS picks a subset (default: all of "tests validate resources bench crossover"); older steps: tune, profile.
# The CuTe kernels (issue 14): STEPS="build cute" builds the extension on the device with the nvidia-cutlass headers
# (JIT, a few minutes), checks the CuTe kernels against the reference, and benches backend "cuda" (CuTe) beside Triton.
set -uo pipefail
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
OUT=${OUT:-/tmp/fc_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PWD:/tmp/site
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
echo "commit ${COMMIT:-unknown} date $(date -u +%F)" | tee -a "$OUT/device.txt"
STEPS=${STEPS:-"tests validate resources bench crossover"}
for step in $STEPS; do
  echo "== $step ($(date -u +%T))"
  case $step in
    tests) timeout ${TESTS_TIMEOUT:-130} python3 -m pytest -q -x ${TESTS:-tests/test_infonce_kernels.py tests/test_autocast_and_syncs.py tests/test_siglip.py tests/test_margin_kernels.py tests/test_codebook.py tests/test_codis.py tests/test_mmts_official.py} -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -4 ;;
    validate) timeout 90 python3 -m fastcontrast validate --device cuda --dtype float32 --dtype bfloat16 --dtype float16 --seeds 2 2>&1 | tee "$OUT/validate.log" | tail -4 ;;
    resources) timeout 60 python3 benchmarks/kernel_resources.py 2>&1 | tee "$OUT/resources.md" | tail -40 ;;
    bench) timeout ${BENCH_TIMEOUT:-120} python3 -m fastcontrast bench --ops clip --sizes ${SIZES:-4096,16384,65536} --dim 768 --dtype bfloat16 --reps 5 --no-progress --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -25 ;;
    crossover) timeout 60 python3 benchmarks/overhead_and_crossover.py --device cuda --sizes 1024,2048,4096,8192,16384 2>&1 | tee "$OUT/crossover.md" | tail -20 ;;
    build) python3 -m pip install -q --no-deps nvidia-cutlass==4.2.0.0 2>&1 | tail -1
           FASTCONTRAST_JIT=1 timeout ${BUILD_TIMEOUT:-300} python3 -c "from fastcontrast import _ext; print('built:', _ext.IMPORT_ERROR or 'ok', 'cute:', _ext._C is not None and _ext._C.has_cute())" 2>&1 | tee "$OUT/build.log" | tail -3 ;;
    cute) FASTCONTRAST_JIT=1 timeout 240 python3 -m pytest -q tests/test_cuda_cute.py tests/test_infonce_kernels.py -k "cuda or cute" -p no:cacheprovider 2>&1 | tee "$OUT/cute_tests.log" | tail -4
          FASTCONTRAST_JIT=1 FASTCONTRAST_CUTE=1 timeout 150 python3 -m fastcontrast bench --ops clip --sizes 16384,65536 --dim 768 --dtype bfloat16 --reps 5 --no-compile --impls "cuda],triton]" --no-progress --out "$OUT/cute" 2>&1 | tee "$OUT/cute_bench.log" | tail -12 ;;
    tune) timeout 200 python3 benchmarks/tune_infonce.py 2>&1 | tee "$OUT/tune.log" ;;
    profile) timeout 120 python3 benchmarks/profile_infonce.py 2>&1 | tee "$OUT/profile.log" | grep -E "^## |Self CUDA time total" ;;
  esac
done
