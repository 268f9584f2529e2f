"""Shared pieces of every tiled op: per-token normalisation, backend checks, and the slab driver.

The slab driver is how every backward here avoids an N×M buffer: a ``fill`` callback (a Triton kernel or
PyTorch) writes the weight matrix W for R rows at a time into an R×M slab, and two dense GEMMs turn it into
W Ŷ and Wᵀ X̂. R comes from a byte budget, so the extra memory is O(M·budget), never O(N·M).
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import Tensor

from ..dispatch import triton_interpret
from ._triton_support import IMPORT_ERROR as _TRITON_IMPORT_ERROR

# Byte budget of one row block (PyTorch forward) or one G slab (backward): 256 MiB is 2048 bf16 rows at M = 64k.
BLOCK_BYTES = 256 * 2**20


def inv_token_norms(x: Tensor, tokens: int) -> Tensor:
    """1 / max(‖x_ik‖, 1e-12) per token (F.normalize's convention), (N, K) in fp32 (fp64 for fp64 input)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n, d = x.shape
    return x.to(acc).reshape(n, tokens, d // tokens).norm(dim=-1).clamp_min(1e-12).reciprocal()


def apply_tokens(x: Tensor, inv: Tensor) -> Tensor:
    n, d = x.shape
    k = inv.shape[1]
    return (x.to(inv.dtype).reshape(n, k, d // k) * inv[:, :, None]).reshape(n, d)


def token_norm_backward(x: Tensor, inv: Tensor, dxh: Tensor) -> Tensor:
    """Gradient through x̂ = x/‖x‖ per token: dx = (dx̂ − x̂⟨x̂, dx̂⟩)/‖x‖."""
    n, d = x.shape
    k = inv.shape[1]
    xh = (x.to(inv.dtype).reshape(n, k, d // k) * inv[:, :, None])
    g = dxh.to(inv.dtype).reshape(n, k, d // k)
    return ((g - xh * (xh * g).sum(-1, keepdim=True)) * inv[:, :, None]).reshape(n, d)


def triton_ok(t: Tensor) -> bool:
    return _TRITON_IMPORT_ERROR is None and t.dtype != torch.float64 and (
        t.device.type == "cuda" or (t.device.type == "cpu" and triton_interpret()))


def rows_per_block(n: int, m: int, elt: int = 4) -> int:
    """Rows of one block (forward) or G slab (backward): a byte budget over M, and at most half of N, so an
    N×M buffer never exists; a multiple of 128 rows (the Triton tile) when the budget allows."""
    r = BLOCK_BYTES // (elt * max(m, 1))
    r = r // 128 * 128 if r >= 128 else max(1, r)
    return max(1, min(r, -(-n // 2)))


def precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"  # match torch's fp32 matmul numerics unless the user opted into tf32
    return "tf32"


def upcast(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.bfloat16  # interpreter work-around, see _dot




def acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def slab_products(fill: Callable[[int, int, Tensor], None], xh: Tensor, yh: Tensor, acc: torch.dtype
                  ) -> Tuple[Tensor, Tensor]:
    """(W Ŷ, Wᵀ X̂) in ``acc`` where fill(r0, rc, slab) writes rows r0:r0+rc of W (N×M) into slab[:rc]."""
    n, d = xh.shape
    m = yh.shape[0]
    rows = rows_per_block(n, m, torch.finfo(xh.dtype).bits // 8)
    slab = torch.empty(min(rows, n), m, dtype=xh.dtype, device=xh.device)
    dxh = torch.empty(n, d, dtype=acc, device=xh.device)
    dyh = torch.zeros(m, d, dtype=acc, device=xh.device)
    for r0 in range(0, n, rows):
        rc = min(rows, n - r0)
        fill(r0, rc, slab)
        w = slab[:rc]
        dxh[r0:r0 + rc] = w @ yh
        dyh += w.T @ xh[r0:r0 + rc]
    return dxh, dyh
