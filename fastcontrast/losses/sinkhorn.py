"""Sinkhorn–Knopp (SwAV's balanced assignment, in log space): ``sinkhorn``, on every backend.

The reference below is the ground truth; the fused kernels (``primitives/sinkhorn.py``: Triton, csrc CPU and
CUDA) run the same iterations in potentials. Triton and the CUDA kernel compute in float32: float64 runs the
reference there. Over ranks: ``fastcontrast.distributed.distributed_sinkhorn``.
"""
from __future__ import annotations

import torch

from ..dispatch import register, register_fused
from ..primitives import sinkhorn as SK


@torch.no_grad()
def sinkhorn_reference(scores: torch.Tensor, epsilon: float = 0.05, n_iters: int = 3) -> torch.Tensor:
    """Balanced soft assignment Q of N samples to K codes, in log space.

    Solves max ⟨Q, scores⟩ + ε·H(Q) with Q 1_K = 1_N (each row a distribution) and Qᵀ 1_N = (N/K) 1_K
    (codes used equally), by alternating column and row normalisation (rows last, so rows sum to 1 exactly).
    scores (N, K) -> Q (N, K), no gradient (teacher side).
    """
    n, k = scores.shape
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    log_q = scores.to(acc) / epsilon
    log_col_target = torch.log(torch.tensor(n / k, dtype=acc, device=scores.device))
    for _ in range(n_iters):
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) + log_col_target
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)
    return log_q.exp()


def sinkhorn_ext(scores, epsilon: float, n_iters: int, *, impl):
    return SK.sinkhorn_ext(scores, epsilon, n_iters, impl.kernel)


register("sinkhorn", "reference")(sinkhorn_reference)
register_fused("sinkhorn", SK.sinkhorn_fused, backends=("triton",), triton_float64="reference")
register_fused("sinkhorn", sinkhorn_ext, backends=("cuda", "cpu"), cuda_float64="reference", cuda_atomics=False)
