#!/usr/bin/env bash
# Compile every .cu in csrc/ with nvcc for sm_80 and sm_90a and report registers, shared memory and spills.
# Fails on a compile error, or on any spill in a kernel. The torch binding (cuda_binding.cpp) needs a CUDA build
# of torch and is not compiled here; the kernels include no torch header, so this checks all device code.
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
for cu in *.cu; do
  log="$out/${cu%.cu}.log"
  if ! "$NVCC" -std=c++17 -O3 -c "$cu" -o "$out/${cu%.cu}.o" \
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
        kern=$(sed -E 's/.*[0-9]+([a-z_]+_kernel)I.*/\1/' <<<"$fn")
        case "$fn" in *13__nv_bfloat16E*) t=bf16 ;; *6__halfE*) t=fp16 ;; *IfE*) t=fp32 ;; *) t=? ;; esac
        name="$kern<$t>"
        printf '  %-7s %-42s %s; %s\n' "$arch" "$name" "$regs" "$spill"
        # hot kernels: the tensor-core (fp16/bf16) instantiations; the fp32 SIMT fallback is reported only
        if [[ "$t" == fp16 || "$t" == bf16 ]] && [[ "$spill" =~ [1-9][0-9]*\ bytes\ spill ]]; then
          echo "compile_check: spills in hot kernel $name ($arch)" >&2
          echo 1 > "$out/fail"
        fi
      done
  [ -f "$out/fail" ] && status=1
done
exit $status
