"""Shared pieces of every tiled op: per-token normalisation, backend checks, and the slab driver.

The slab driver is how every backward here avoids an N×M buffer: a ``fill`` callback (a Triton kernel or
PyTorch) writes the weight matrix W for R rows at a time into an R×M slab, and two dense GEMMs turn it into
W Ŷ and Wᵀ X̂. R comes from a byte budget, so the extra memory is O(M·budget), never O(N·M).
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

import torch
from torch import Tensor


# Byte budget of one row block (PyTorch forward) or one G slab (backward): 256 MiB is 2048 bf16 rows at M = 64k.
BLOCK_BYTES = 256 * 2**20


def _unit_max(x: Tensor, dim: int):
    """(x/m, m), m = max|x| over ``dim`` (kept, no gradient: what follows does not depend on it)."""
    m = x.detach().abs().amax(dim=dim, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    return x / m, m


def inv_l2_norm(x: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    """1 / max(‖x‖, eps) over ``dim`` (kept), as (1/m) / max(‖x/m‖, eps/m): neither the squares nor the
    gradient's 1/‖x‖² leave the float range. A plain fp32 norm is inf above |x| ~ 1.8e19 (x/‖x‖ becomes 0), and
    autograd's 1/‖x‖² underflows long before (the normalisation's Jacobian loses its radial term)."""
    u, m = _unit_max(x, dim)
    return torch.maximum(u.norm(dim=dim, keepdim=True), eps / m).reciprocal() / m


def l2_normalize(x: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    """x / max(‖x‖, eps) (F.normalize's convention) over the range-safe norm of :func:`inv_l2_norm`."""
    u, m = _unit_max(x, dim)
    return u / torch.maximum(u.norm(dim=dim, keepdim=True), eps / m)


def inv_token_norms(x: Tensor, tokens: int) -> Tensor:
    """1 / max(‖x_ik‖, 1e-12) per token (F.normalize's convention), (N, K) in fp32 (fp64 for fp64 input)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n, d = x.shape
    return inv_l2_norm(x.to(acc).reshape(n, tokens, d // tokens)).squeeze(-1)


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


def double_backward_error(op: str, backend: str, alternative: str = "backend='reference'") -> RuntimeError:
    """The error of every fused backward asked for a differentiable gradient (create_graph=True): its gradients
    come from kernels (or saved, detached statistics) without a derivative of their own, so a second derivative
    (a gradient penalty, a meta-learning step, a Hessian-vector product) would be silently wrong."""
    return RuntimeError(
        f"fastcontrast: double backward is not supported by backend {backend!r} for {op}: its backward is a fused "
        "kernel without a derivative of its own, so a gradient of its gradient (create_graph=True) would be "
        f"silently wrong; use {alternative}, which computes exact second derivatives")


def no_double_backward(op: str, backend: str, alternative: str = "backend='reference'") -> None:
    """Raise :func:`double_backward_error` where a fused backward runs with grad mode on, i.e. under
    ``create_graph=True``. A first-order backward (eager, or compiled by torch.compile, whose joint graph traces
    the backward without grad mode) only pays this one flag read."""
    if torch.is_grad_enabled():
        raise double_backward_error(op, backend, alternative)


def rows_per_block(n: int, m: int, elt: int = 4) -> int:
    """Rows of one block (forward) or G slab (backward): a byte budget over M, and at most half of N, so an
    N×M buffer never exists; a multiple of 128 rows (the Triton tile) when the budget allows."""
    r = BLOCK_BYTES // (elt * max(m, 1))
    r = r // 128 * 128 if r >= 128 else max(1, r)
    return max(1, min(r, -(-n // 2)))


def row_blocks(n: int, m: int, elt: int = 4) -> Iterator[slice]:
    """The row blocks of an N×M computation done a block at a time (:func:`rows_per_block` rows each): every
    blockwise PyTorch loop of the package walks these, so none holds more than one R×M block."""
    step = rows_per_block(n, m, elt)
    for i0 in range(0, n, step):
        yield slice(i0, min(i0 + step, n))


def precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"  # match torch's fp32 matmul numerics unless the user opted into tf32
    return "tf32"


def upcast(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.bfloat16  # interpreter work-around, see _dot


def acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def empty_grads(x: Tensor, y: Tensor, a: Tensor, c: Tensor, acc_out: bool = False):
    """The fake (meta) outputs of a pairwise backward: (dx, dy, da, dc) like the inputs, or all in the
    accumulation dtype (``acc_out``: for a caller that sums them over blocks)."""
    if acc_out:
        acc = acc_dtype(x)
        return tuple(torch.empty_like(t, dtype=acc) for t in (x, y, a, c))
    return tuple(torch.empty_like(t) for t in (x, y, a, c))


def slab_dtype(xh: Tensor) -> torch.dtype:
    """dtype of the W slab the fill callbacks write: the GEMM operand dtype, except for 16-bit operands on the
    CPU, where no GEMM has an fp32 output (aten::mm.dtype is CUDA-only): there the slab and the operands are fp32,
    so the products are the exact fp32 sums a GPU's fp32-output GEMM computes."""
    if xh.device.type != "cuda" and xh.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return xh.dtype


_OUT_DTYPE = {}  # device type -> "addmm" | "mm" | None: how a 16-bit GEMM writes fp32 here (probed once)


def _fp32_gemm_mode(device: torch.device) -> Optional[str]:
    """How 16-bit operands reach an fp32 result without a 16-bit temporary: "addmm" (addmm.dtype accumulates
    into the fp32 buffer itself, newer torch), "mm" (mm.dtype writes an fp32 product that is then added), or None
    (torch without out_dtype: the product is rounded to the input dtype, the pre-issue-17 behaviour)."""
    if device.type not in _OUT_DTYPE:
        a = torch.zeros(2, 2, device=device, dtype=torch.bfloat16)
        acc = torch.zeros(2, 2, device=device, dtype=torch.float32)
        mode = None
        try:
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            mode = "addmm"
        except (RuntimeError, TypeError, NotImplementedError):
            try:
                torch.mm(a, a, out_dtype=torch.float32)
                mode = "mm"
            except (RuntimeError, TypeError, NotImplementedError):
                mode = None
        _OUT_DTYPE[device.type] = mode
    return _OUT_DTYPE[device.type]


def _gemm_into(out: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> None:
    """out (fp32/fp64) = a @ b, or += a @ b when ``accumulate``; a, b share a dtype (16-bit only on CUDA)."""
    if a.dtype == out.dtype:
        if accumulate:
            torch.addmm(out, a, b, out=out)  # aten::addmm.out (what the FLOP counter of the unit tests sees)
        else:
            torch.mm(a, b, out=out)
        return
    mode = _fp32_gemm_mode(a.device)
    if mode == "addmm":
        torch.addmm(out, a, b, beta=1 if accumulate else 0, out_dtype=out.dtype, out=out)
    elif mode == "mm" and accumulate:
        out.add_(torch.mm(a, b, out_dtype=out.dtype))
    elif mode == "mm":
        torch.mm(a, b, out_dtype=out.dtype, out=out)
    elif accumulate:  # no fp32-output GEMM in this torch: the product is rounded to a's dtype
        out.add_(a @ b)
    else:
        out.copy_(a @ b)


def slab_products(fill: Callable[[int, int, Tensor], None], xh: Tensor, yh: Tensor, acc: torch.dtype,
                  need: Tuple[bool, bool] = (True, True)) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(W Ŷ, Wᵀ X̂) accumulated in ``acc`` (fp32 or fp64) where fill(r0, rc, slab) writes rows r0:r0+rc of W (N×M)
    into slab[:rc]; ``need`` skips a product nobody asked for (None in its place).

    The GEMMs write straight into the ``acc`` buffers (fp32 output from 16-bit operands on CUDA, see
    :func:`_fp32_gemm_mode`): no per-slab product is rounded to the input dtype. The slab is as tall as the byte
    budget allows (:func:`rows_per_block`), so the GEMMs run on R×M×D shapes, R up to 2048 at M = 64k in bf16."""
    n, d = xh.shape
    m = yh.shape[0]
    sdt = slab_dtype(xh)
    if sdt != xh.dtype:  # 16-bit on the CPU: fp32 operands, converted once (O((N+M)·D))
        xh, yh = xh.to(sdt), yh.to(sdt)
    rows = rows_per_block(n, m, torch.finfo(sdt).bits // 8)
    slab = torch.empty(min(rows, n), m, dtype=sdt, device=xh.device)
    dxh = torch.empty(n, d, dtype=acc, device=xh.device) if need[0] else None
    dyh = torch.zeros(m, d, dtype=acc, device=xh.device) if need[1] else None
    for r0 in range(0, n, rows):
        rc = min(rows, n - r0)
        fill(r0, rc, slab)
        w = slab[:rc]
        if dxh is not None:
            _gemm_into(dxh[r0:r0 + rc], w, yh, accumulate=False)
        if dyh is not None:
            _gemm_into(dyh, w.T, xh[r0:r0 + rc], accumulate=True)
    return dxh, dyh
