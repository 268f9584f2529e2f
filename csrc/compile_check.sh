#!/usr/bin/env bash
# Compile every .cu in csrc/ with nvcc for sm_80 and sm_90a and report registers, shared memory and spills.
# Fails on a compile error, or on a spill in any kernel but the fp32 SIMT fallback of lse_pair_cuda.cu, or when a CuTe
# kernel's SASS lacks tensor-core MMAs or asynchronous copies. The kernels
# include no torch header, so nvcc alone checks all device code. The torch binding (cuda_binding.cpp) is then
# syntax- and type-checked with g++ against the headers of the torch that $PYTHON imports (a CPU torch lacks one
# generated CUDA header, stubbed here); linking it needs a CUDA build of torch, i.e. a GPU machine.
set -euo pipefail
cd "$(dirname "$0")"
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then
  echo "compile_check: no nvcc found (looked for \$NVCC, PATH and /usr/local/cuda/bin/nvcc)" >&2
  exit 1
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
PY=${PYTHON:-python3}
# the CuTe kernels need the CUTLASS/CuTe headers of the nvidia-cutlass package (CI installs it)
CUTLASS=$("$PY" -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))" 2>/dev/null || true)
CUOBJDUMP=$("$PY" -c "import triton, os; print(os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump'))" 2>/dev/null || echo cuobjdump)
for cu in *.cu; do
  log="$out/${cu%.cu}.log"
  extra=()
  if [[ "$cu" == *_cute.cu ]]; then
    if [ -z "$CUTLASS" ] || [ ! -f "$CUTLASS/cute/tensor.hpp" ]; then
      echo "compile_check: $cu needs the nvidia-cutlass headers (pip install nvidia-cutlass)" >&2
      exit 1
    fi
    extra=(-I"$CUTLASS" --expt-relaxed-constexpr)
  fi
  if ! "$NVCC" -std=c++20 -O3 -c "$cu" -o "$out/${cu%.cu}.o" "${extra[@]}" \
      -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a \
      -Xptxas -v >"$log" 2>&1; then
    cat "$log"
    echo "compile_check: FAILED to compile $cu" >&2
    exit 1
  fi
  echo "== $cu: nvcc $("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), sm_80 + sm_90a"
  # one line per kernel and arch: demangled name, registers, shared memory, spills
  awk '/Compiling entry function/ {match($0, /_Z[A-Za-z0-9_]+/); fn=substr($0, RSTART, RLENGTH); match($0, /sm_[0-9a]+/); arch=substr($0, RSTART, RLENGTH)}
       /bytes spill stores/ {split($0, p, "|"); spill=$0; sub(/.*: +/, "", spill)}
       /Used [0-9]+ registers/ {regs=$0; sub(/.*: +/, "", regs); print arch "\t" fn "\t" regs "\t" spill}' "$log" \
    | while IFS=$'\t' read -r arch fn regs spill; do
        kern=$(sed -E 's/.*[0-9]+([a-z_]+_kernel)[IE].*/\1/' <<<"$fn")
        case "$fn" in *13__nv_bfloat16E*|*10bfloat16_tE*) t=bf16 ;; *6__halfE*|*6half_tE*) t=fp16 ;; *IfE*) t=fp32 ;; *) t=- ;; esac
        name="$kern<$t>"
        printf '  %-7s %-42s %s; %s\n' "$arch" "$name" "$regs" "$spill"
        # every kernel is hot except the fp32 SIMT fallback of the lse tiles (tensor cores take fp16/bf16), which is
        # reported only
        if ! [[ "$t" == fp32 && "$cu" == lse_pair_cuda.cu ]] && [[ "$spill" =~ [1-9][0-9]*\ bytes\ spill ]]; then
          echo "compile_check: spills in hot kernel $name ($arch)" >&2
          echo 1 > "$out/fail"
        fi
      done
  [ -f "$out/fail" ] && status=1
  if [[ "$cu" == *_cute.cu ]]; then
    # proof from the SASS, per kernel and arch: tensor-core MMAs (HMMA; HGMMA for WGMMA kernels) and asynchronous
    # global->shared copies (LDGSTS; UTMALDG for TMA) in the main loop, and ldmatrix (LDSM)
    for arch in sm_80 sm_90a; do
      "$CUOBJDUMP" -sass -arch "$arch" "$out/${cu%.cu}.o" > "$out/$arch.sass"
      awk -v arch="$arch" '
        /Function :/ { if (fn) report(); fn = $3; mma = cp = ldsm = 0 }
        /HMMA|HGMMA/ { mma++ } /LDGSTS|UTMALDG/ { cp++ } /LDSM/ { ldsm++ }
        function report() {
          name = fn; sub(/.*cu_[0-9a-f]+[0-9]+/, "", name); sub(/I.*/, "", name)
          t = (fn ~ /bfloat16/) ? "bf16" : "fp16"
          printf "  %-7s %-30s SASS: %d tensor-core MMA, %d async copies, %d ldmatrix\n", arch, name "<" t ">", mma, cp, ldsm
          if (mma == 0 || cp == 0) { print "compile_check: " name "<" t "> (" arch ") lacks tensor-core MMA or async copies" > "/dev/stderr"; bad = 1 }
        }
        END { if (fn) report(); exit bad }' "$out/$arch.sass" || status=1
    done
  fi
done

if inc=$("$PY" -c "from torch.utils.cpp_extension import include_paths; import sysconfig; \
print(' '.join(['-I' + p for p in include_paths()] + ['-I' + sysconfig.get_paths()['include']]))" 2>/dev/null); then
  cuda_inc=${CUDA_HOME:-/usr/local/cuda}/include
  mkdir -p "$out/stub/c10/cuda/impl"
  echo '#pragma once' > "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
  # shellcheck disable=SC2086
  if ! g++ -std=c++20 -fsyntax-only $inc -idirafter "$out/stub" -I"$cuda_inc" \
      -DTORCH_EXTENSION_NAME=_C -DFASTCONTRAST_WITH_CUDA=1 -DFASTCONTRAST_WITH_CUTE=1 cuda_binding.cpp lse_pair_cpu.cpp; then
    echo "compile_check: FAILED to compile the torch binding (cuda_binding.cpp, lse_pair_cpu.cpp with CUDA)" >&2
    exit 1
  fi
  echo "== cuda_binding.cpp + lse_pair_cpu.cpp (FASTCONTRAST_WITH_CUDA): g++ syntax/type check against torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "compile_check: torch is not importable by $PY; the binding was not checked (set PYTHON)"
fi
exit $status
