"""Sinkhorn–Knopp in potential (log) form over a stored N×K score matrix: Triton kernels
(``sinkhorn_triton.py``) or the C++/CUDA kernels of csrc/. The same iterations as the reference
(``fastcontrast.losses.sinkhorn``): columns, then rows, ``n_iters`` times, in potentials u, v; no N×K
temporaries besides the output Q.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _ext
from .configs import is_aligned
from .configs import launch as launch_config
from .triton_support import triton

if triton is not None:
    from . import sinkhorn_triton as K


@torch.no_grad()
def sinkhorn_fused(scores: Tensor, epsilon: float, n_iters: int) -> Tensor:
    """Same iterations as the reference (columns, then rows, ``n_iters`` times), in potentials u, v."""
    s = scores.contiguous()
    n, k = s.shape
    al = is_aligned("_lse_axis_kernel", C=k, stride_r=s.stride(0))
    cfg, warps, stages = launch_config("_lse_axis_kernel", s.device, s.dtype, al)
    br, bc = cfg["BLOCK_R"], cfg["BLOCK_C"]
    u = torch.zeros(n, device=s.device, dtype=torch.float32)
    v = torch.empty(k, device=s.device, dtype=torch.float32)
    inv_eps = 1.0 / epsilon
    log_col = math.log(n / k)
    for _ in range(n_iters):
        K._lse_axis_kernel[(triton.cdiv(k, bc),)](s, u, v, n, k, s.stride(0), inv_eps, log_col, AXIS=0,
                                                   num_warps=warps, num_stages=stages, **cfg)
        K._lse_axis_kernel[(triton.cdiv(n, br),)](s, v, u, n, k, s.stride(0), inv_eps, 0.0, AXIS=1,
                                                   num_warps=warps, num_stages=stages, **cfg)
    q = torch.empty(n, k, device=s.device, dtype=torch.float32)
    cfg, warps, stages = launch_config("_sinkhorn_out_kernel", s.device, s.dtype)
    K._sinkhorn_out_kernel[(triton.cdiv(n, cfg["BLOCK_R"]), triton.cdiv(k, cfg["BLOCK_C"]))](
        s, u, v, q, n, k, s.stride(0), q.stride(0), inv_eps, num_warps=warps, num_stages=stages, **cfg)
    return q


@torch.no_grad()
def sinkhorn_ext(scores: Tensor, epsilon: float, n_iters: int, kernel: str) -> Tensor:
    """The same potentials on the kernels of csrc/ (sinkhorn_cpu.cpp: fp32/fp64; sinkhorn_cuda.cu: fp32)."""
    keep64 = scores.dtype == torch.float64 and kernel == "cpu"
    s = scores.to(torch.float64 if keep64 else torch.float32).contiguous()
    return getattr(_ext._C, f"sinkhorn_{kernel}")(s, float(epsilon), int(n_iters))
