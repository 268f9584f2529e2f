#!/usr/bin/env bash
# One device-tool call that cannot lose its results (issue 17). Every step streams its rows to a file in $OUT the
# moment each is measured (bench, A/B, validate, kernel resources), and $OUT ends with at most 8 files:
#   session.log (everything printed), validate.md, resources.md, ab.csv, bench.csv, summary.md (the final tables,
#   the per-arch A/B table to paste into ops/_configs.DEFAULT_VARIANT), pytest.log (step tests), device.txt.
# Default steps (validate ab bench resources) fit ~6 min of a fresh H200 including Triton compilation:
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_session.sh        # device call, carry [".whl"]
# Baselines the device image lacks travel as wheels in .whl/ (ignored by git; carry it): fetch them here with
#   bash benchmarks/gpu_session.sh wheels
# Dry run of the whole flow on a CPU (interpreter, tiny sizes, < 5 min; CI runs it):
#   FASTCONTRAST_GPU_DRY_RUN=1 OUT=/tmp/x bash benchmarks/gpu_session.sh
# STEPS picks steps: validate ab bench resources tests crossover build cute tune profile.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "wheels" ]; then  # here, with a registry: the baselines' wheels for the device's Python 3.12
  mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    siglip-kernel==0.1.2 inf-cl==1.2.1 nvidia-cutlass==4.2.0.0 open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
  du -ch .whl/*.whl | tail -1
  exit 0
fi
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
OUT=${OUT:-/tmp/fc_out}; mkdir -p "$OUT"
DRY=${FASTCONTRAST_GPU_DRY_RUN:-0}
PY=${PYTHON:-python3}
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  PY=${PYTHON:-.venv/bin/python}
  SIZES_AB=${SIZES_AB:-64}; SIZES=${SIZES:-64}; DIM=${DIM:-32}; DEV=cpu; REPS=1; VSIZE=20,30,32,2
else
  SIZES_AB=${SIZES_AB:-4096,16384,65536}; SIZES=${SIZES:-4096,16384,65536}; DIM=${DIM:-768}; DEV=cuda; REPS=${REPS:-5}
  VSIZE=37,53,40,3
fi
LOG="$OUT/session.log"
log() { echo "$@" | tee -a "$LOG"; }
if ls .whl/*.whl >/dev/null 2>&1 && [ "$DRY" != 1 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tail -2 | tee -a "$LOG"
  export PYTHONPATH=$PWD:/tmp/site
else
  export PYTHONPATH=$PWD
  [ "$DRY" = 1 ] || log "no .whl/: siglip-kernel, Inf-CL and open_clip rows will say they are not installed"
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "no nvidia-smi (dry run)"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)} date $(date -u +%F) dry_run $DRY"; } \
  2>&1 | tee "$OUT/device.txt" >> "$LOG"
STEPS=${STEPS:-"validate ab bench resources"}
step() {  # step NAME TIMEOUT FILE CMD...: streams CMD's output to FILE and the log; a timeout keeps what ran
  local name=$1 t=$2 file=$3; shift 3
  log "== $name ($(date -u +%T), timeout ${t}s)"
  timeout "$t" "$@" 2>&1 | tee -a "$file" >> "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || log "== $name: exit $rc$([ "$rc" = 124 ] && echo ' (timed out: the rows above are what it measured)')"
}
for s in $STEPS; do
  case $s in
    validate) step validate 80 "$OUT/validate.md" $PY -m fastcontrast.validate --device $DEV --dtype float32 \
                --dtype bfloat16 --dtype float16 --seeds 1 --backend triton --size $VSIZE ;;
    ab) step ab 150 "$OUT/session.ab.txt" $PY -m fastcontrast.bench --ops clip,siglip --sizes $SIZES_AB --dim $DIM \
          --dtype $([ "$DRY" = 1 ] && echo float32 || echo bfloat16) --device $DEV --reps $REPS --variants all \
          --stream-csv "$OUT/ab.csv" --no-progress ;;
    bench) step bench 120 "$OUT/session.bench.txt" $PY -m fastcontrast.bench --ops clip,siglip --sizes $SIZES \
             --dim $DIM --dtype $([ "$DRY" = 1 ] && echo float32 || echo bfloat16) --device $DEV --reps $REPS \
             --compile-max 4096 --explain-missing --stream-csv "$OUT/bench.csv" --no-progress \
             --impls "fastcontrast[triton],compiled,eager,Inf-CL,siglip-kernel,open_clip" ;;
    resources) step resources 45 "$OUT/resources.md" $PY benchmarks/kernel_resources.py ;;
    tests) step tests 120 "$OUT/pytest.log" $PY -m pytest -q -x -p no:cacheprovider tests/test_infonce_kernels.py \
             tests/test_siglip.py tests/test_margin_kernels.py tests/test_triton_variants.py tests/test_deterministic.py ;;
    crossover) step crossover 60 "$OUT/session.crossover.txt" $PY benchmarks/overhead_and_crossover.py --device $DEV \
                 --sizes 1024,2048,4096,8192,16384 ;;
    build) step build 300 "$OUT/session.build.txt" env FASTCONTRAST_JIT=1 $PY -c "from fastcontrast import _ext; \
             print('built:', _ext.IMPORT_ERROR or 'ok', 'cute:', _ext._C is not None and _ext._C.has_cute())" ;;
    cute) step cute 240 "$OUT/session.cute.txt" env FASTCONTRAST_JIT=1 $PY -m pytest -q tests/test_cuda_cute.py \
            -k "cuda or cute" -p no:cacheprovider ;;
    tune) step tune 200 "$OUT/session.tune.txt" $PY benchmarks/tune_infonce.py ;;
    profile) step profile 120 "$OUT/session.profile.txt" $PY benchmarks/profile_infonce.py ;;
    *) log "unknown step $s" ;;
  esac
done
# the final tables in one file; the per-step text files fold into it so $OUT keeps <= 8 files
{ echo "# GPU session $(head -1 "$OUT/device.txt") — $(tail -1 "$OUT/device.txt")"
  for f in "$OUT"/session.*.txt; do [ -e "$f" ] || continue
    echo; echo "## ${f##*/session.}"; grep -v '^\[' "$f" | sed -n '/^## Launch-table A\/B/,$p;/^| op | N | impl | fwd ms (min\/med\/max) | fwd+bwd ms (min\/med\/max) | × eager/,/^floor:/p'
    cat "$f" >> "$LOG.steps"; rm -f "$f"; done; } > "$OUT/summary.md"
[ -e "$LOG.steps" ] && { echo "== step outputs"; cat "$LOG.steps"; } >> "$LOG" && rm -f "$LOG.steps"
log "== done ($(date -u +%T)); files in $OUT: $(ls "$OUT" | wc -l)"
cat "$OUT/summary.md"
