"""The CuTe kernels of csrc/lse_pair_cute.cu (backend "cuda" with FASTCONTRAST_CUTE=1) against the float64 reference,
on a GPU. Without a GPU their proof is static: csrc/compile_check.sh (CI) compiles them for sm_80 and sm_90a and
checks registers, spills, and the SASS for tensor-core MMAs and asynchronous copies."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import HAS_CUDA

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; CI and dev machines are CPU-only")

_CHECK = r"""
import torch, fastcontrast as fc
from fastcontrast import _ext
from fastcontrast.validate import TOL, compare, default_cases
assert _ext._C is not None and _ext._C.has_cute(), "the extension was built without the CuTe kernels"
worst = 0.0
for dt in (torch.bfloat16, torch.float16):
    for n, m, d in ((37, 53, 40), (300, 129, 64), (128, 64, 768), (5, 700, 24)):
        for case in default_cases(n=n, m=m, d=d, k=2):
            if case.op != "infonce":
                continue
            for seed in (0, 1):
                f, b, _ = compare(case, "cuda", dt, torch.device("cuda"), seed)
                assert f <= TOL[dt] and b <= TOL[dt], (case.name, dt, n, m, d, f, b)
                worst = max(worst, f, b)
print("ok", worst)
"""


def test_cute_kernels_match_reference():
    from fastcontrast import _ext

    if _ext._C is None or not getattr(_ext._C, "has_cute", lambda: False)():
        pytest.skip("fastcontrast._C was built without the CuTe kernels (pip install nvidia-cutlass, then rebuild)")
    r = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "FASTCONTRAST_CUTE": "1"})
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr[-3000:]
