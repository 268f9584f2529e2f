#!/usr/bin/env bash
# One device-tool call: tests on CUDA, validation table, tile sweep, benchmark. Logs land in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/fc_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PWD:/tmp/site
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
echo "commit ${COMMIT:-unknown}" | tee -a "$OUT/device.txt"
STEPS=${STEPS:-"tests validate tune bench"}
for step in $STEPS; do
  case $step in
    tests) timeout ${TESTS_TIMEOUT:-240} python3 -m pytest -q ${TESTS:-tests} -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -4 ;;
    validate) timeout 180 python3 -m fastcontrast validate --device cuda --dtype float32 --dtype bfloat16 --dtype float16 2>&1 | tee "$OUT/validate.log" | tail -4 ;;
    tune) timeout 200 python3 benchmarks/tune_infonce.py 2>&1 | tee "$OUT/tune.log" ;;
    profile) timeout 120 python3 benchmarks/profile_infonce.py 2>&1 | tee "$OUT/profile.log" | grep -E "^## |Self CUDA time total" ;;
    bench) timeout ${BENCH_TIMEOUT:-300} python3 -m fastcontrast bench --sizes ${SIZES:-4096,16384,65536} --dim 768 --dtype bfloat16 --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -25 ;;
  esac
done
