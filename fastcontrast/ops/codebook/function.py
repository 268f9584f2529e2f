"""Fused codebook ops: Sinkhorn in potential form (Triton; C++ on the CPU), and the cluster-softmax cross-entropy
built on the tiled log-sum-exp of the InfoNCE family (every backend of ``lse_pair``), so no N×K logits or
probabilities are ever materialised.

Swapped prediction: −mean_i Σ_k Q_ik log softmax_k(ẑ_i·ĉ_k/τ) = mean_i [ (Σ_k Q_ik)·lse_i − ⟨ẑ_i, (QĈ)_i⟩/τ ].
Triton/CUDA: lse_i from ``fastcontrast::lse_pair`` (tiled, recomputing in backward) and QĈ as one GEMM. CPU:
``fastcontrast::soft_ce_rows``, where the target term rides in the lse pass and in the gradient block G, which
saves two of the six GEMMs (the CPU is GEMM-bound). The targets Q (N×K, no gradient) are the only N×K buffer.
"""
from __future__ import annotations

import functools
import math

from typing import Tuple

import torch
from torch import Tensor

from ... import _ext
from ..._amp import register_custom_op as register_autocast
from ..._memtrack import OPAQUE_IMPLS
from ...dispatch import register
from .. import _tiles as T
from .._configs import launch as launch_config
from .._triton_support import IMPORT_ERROR as _TRITON_IMPORT_ERROR
from ..infonce.function import lse_pair


@torch.no_grad()
def sinkhorn_fused(scores: Tensor, epsilon: float, n_iters: int) -> Tensor:
    """Same iterations as the reference (columns, then rows, ``n_iters`` times), in potentials u, v."""
    from . import triton_kernels as K

    s = scores.contiguous()
    n, k = s.shape
    cfg, warps, stages = launch_config("_lse_axis_kernel", s.device, s.dtype)
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
def sinkhorn_ext(scores: Tensor, epsilon: float, n_iters: int, impl: str) -> Tensor:
    """The same potentials on the kernels of csrc/ (sinkhorn_cpu.cpp: fp32/fp64; sinkhorn_cuda.cu: fp32)."""
    keep64 = scores.dtype == torch.float64 and impl == "cpu"
    s = scores.to(torch.float64 if keep64 else torch.float32).contiguous()
    return getattr(_ext._C, f"sinkhorn_{impl}")(s, float(epsilon), int(n_iters))


@torch.library.custom_op("fastcontrast::soft_ce_rows", mutates_args=())
def soft_ce_rows(x: Tensor, y: Tensor, targets: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """(ℓ (N,), lse (N,)) with ℓ_i = −Σ_k T_ik log softmax_k(scale·⟨x_i, y_k⟩): x (N, D), y (K, D), T (N, K), one
    float dtype. The C++ kernel when built, else the same blocks in PyTorch; never an N×K score matrix."""
    return _soft_ce_impl(x, y, targets, scale)


def _soft_ce_impl(x, y, targets, scale):
    if x.device.type == "cpu" and _ext._C is not None:
        return tuple(_ext._C.soft_ce_cpu_forward(x, y, targets, float(scale), T.BLOCK_BYTES))
    loss, lse = torch.empty_like(x[:, 0]), torch.empty_like(x[:, 0])
    step = T.rows_per_block(x.shape[0], y.shape[0], x.element_size())
    for i0 in range(0, x.shape[0], step):
        s = scale * (x[i0:i0 + step] @ y.T)
        t = targets[i0:i0 + step]
        lse[i0:i0 + step] = torch.logsumexp(s, dim=1)
        loss[i0:i0 + step] = t.sum(1) * lse[i0:i0 + step] - (t * s).sum(1)
    return loss, lse


@soft_ce_rows.register_fake
def _(x, y, targets, scale):
    return x.new_empty(x.shape[0]), x.new_empty(x.shape[0])


@torch.library.custom_op("fastcontrast::soft_ce_rows_backward", mutates_args=())
def soft_ce_rows_backward(g: Tensor, x: Tensor, y: Tensor, targets: Tensor, scale: float, lse: Tensor
                          ) -> Tuple[Tensor, Tensor]:
    """(dx, dy) of Σ_i g_i ℓ_i: G = g·scale·((Σ_k T_ik)·P − T) one row block at a time, then G·Y and Gᵀ·X."""
    return _soft_ce_backward_impl(g, x, y, targets, scale, lse)


def _soft_ce_backward_impl(g, x, y, targets, scale, lse):
    if x.device.type == "cpu" and _ext._C is not None:
        return tuple(_ext._C.soft_ce_cpu_backward(g, x, y, targets, float(scale), lse, T.BLOCK_BYTES))
    dx, dy = torch.empty_like(x), torch.zeros_like(y)
    step = T.rows_per_block(x.shape[0], y.shape[0], x.element_size())
    for i0 in range(0, x.shape[0], step):
        xb, t = x[i0:i0 + step], targets[i0:i0 + step]
        p = torch.exp(scale * (xb @ y.T) - lse[i0:i0 + step, None])
        gb = (g[i0:i0 + step, None] * scale) * (t.sum(1, keepdim=True) * p - t)
        dx[i0:i0 + step] = gb @ y
        dy += gb.T @ xb
    return dx, dy


@soft_ce_rows_backward.register_fake
def _(g, x, y, targets, scale, lse):
    return torch.empty_like(x), torch.empty_like(y)


def _soft_ce_setup(ctx, inputs, output):
    x, y, targets, scale = inputs
    ctx.save_for_backward(x, y, targets, output[1])
    ctx.scale = scale


_SOFT_CE_OP = "codebook_loss (its fused soft cross-entropy fastcontrast::soft_ce_rows)"


def _soft_ce_backward(ctx, g, _g_lse):
    T.no_double_backward(_SOFT_CE_OP, "cpu")  # create_graph=True: the kernel's gradient has no derivative
    x, y, targets, lse = ctx.saved_tensors
    dx, dy = soft_ce_rows_backward(g.contiguous(), x, y, targets, ctx.scale, lse)
    return dx, dy, None, None


soft_ce_rows.register_autograd(_soft_ce_backward, setup_context=_soft_ce_setup)


def _soft_ce_backward_no_double_backward(ctx, *grads):  # direct callers of the backward op
    raise T.double_backward_error(_SOFT_CE_OP, "cpu")


soft_ce_rows_backward.register_autograd(_soft_ce_backward_no_double_backward,
                                        setup_context=lambda ctx, inputs, output: None)
register_autocast("fastcontrast::soft_ce_rows", (0, 1, 2))  # x, y, targets: one dtype, as the kernel needs
register_autocast("fastcontrast::soft_ce_rows_backward", (0, 1, 2, 3))
OPAQUE_IMPLS[torch.ops.fastcontrast.soft_ce_rows.default] = _soft_ce_impl  # probes look inside (_memtrack)
OPAQUE_IMPLS[torch.ops.fastcontrast.soft_ce_rows_backward.default] = _soft_ce_backward_impl


def swapped_prediction_fused(z: Tensor, q: Tensor, codebook: Tensor, tau: float, normalize_features: bool = True,
                             normalize_codes: bool = True, impl: str = "triton") -> Tensor:
    """−mean_i Σ_k Q_ik log softmax_k(⟨ẑ_i, ĉ_k⟩/τ) without an N×K logit matrix; gradients to z and codebook."""
    acc = T.acc_dtype(z)
    n, k = z.shape[0], codebook.shape[0]
    # the two sides may be normalised differently, so normalisation happens here (autograd carries it)
    zh = T.apply_tokens(z, T.inv_token_norms(z, 1)) if normalize_features else z.to(acc)
    ch = T.apply_tokens(codebook, T.inv_token_norms(codebook, 1)) if normalize_codes else codebook.to(acc)
    if impl == "cpu":  # dense fp32 (fp64) operands for BLAS; the normalisation's Jacobian through autograd
        loss, _ = soft_ce_rows(zh.contiguous(), ch.contiguous(), q.to(acc).contiguous(), 1.0 / tau)
        return loss.mean()
    inv_tau = torch.full((n,), 1.0 / tau, device=z.device, dtype=acc)
    col_scale = torch.full((k,), 1.0 / tau, device=z.device, dtype=acc)
    zero = torch.zeros((), device=z.device, dtype=acc)
    if normalize_features == normalize_codes:  # normalisation fused in the kernel (fp32 per-token norms)
        lse, _ = lse_pair(z, codebook.to(z.dtype), inv_tau, col_scale, zero, normalize_features, 1, impl)
    else:  # kernel operands: the normalised copies, in the input dtype (tensor cores)
        lse, _ = lse_pair(zh.to(z.dtype), ch.to(z.dtype), inv_tau, col_scale, zero, False, 1, impl)
    q = q.to(acc)
    target = (zh * (q @ ch)).sum(dim=1) / tau  # Σ_k Q_ik ⟨ẑ_i, ĉ_k⟩/τ as one GEMM and a row dot
    return (q.sum(dim=1) * lse - target).mean()


@torch.no_grad()
def soft_target_values(t: Tensor, k: Tensor, scale: Tensor) -> Tensor:
    """V_i = Σ_j softmax_j(s·⟨t_i, k_j⟩)·k_j (N, D), a row block at a time (a byte budget, never N×M): the
    momentum teacher's soft targets, already multiplied into the keys (attention with values = keys)."""
    v = torch.empty_like(t)
    step = T.rows_per_block(t.shape[0], k.shape[0], t.element_size())
    for i0 in range(0, t.shape[0], step):
        v[i0:i0 + step] = torch.softmax(scale * (t[i0:i0 + step] @ k.T), dim=1) @ k
    return v


def momentum_contrastive_fused(query: Tensor, keys: Tensor, teacher_query, queue, logit_scale: Tensor,
                               alpha: float, normalize: bool, impl: str = "triton") -> Tensor:
    """ALBEF's contrastive term with momentum distillation without an N×(N+Q) matrix:
    −Σ_j T_ij log softmax_j(L_ij) = lse_i(L) − s·⟨q̂_i, α·V_i + (1 − α)·k̂_i⟩, V the teacher-softmax-weighted
    keys (no gradient), lse from the tiled ``lse_pair`` (gradients to the query and the scale)."""
    acc = T.acc_dtype(query)
    n = query.shape[0]
    s = logit_scale.to(acc)
    with torch.no_grad():
        k = keys if queue is None else torch.cat([keys, queue.to(keys.dtype)])
        kh = T.apply_tokens(k, T.inv_token_norms(k, 1)) if normalize else k.to(acc)
    zero = torch.zeros((), device=query.device, dtype=acc)
    lse, _ = lse_pair(query, k.to(query.dtype), s.expand(n), s.expand(k.shape[0]), zero, normalize, 1, impl)
    qh = T.apply_tokens(query, T.inv_token_norms(query, 1)) if normalize else query.to(acc)
    target = kh[:n]
    if alpha > 0:
        th = T.apply_tokens(teacher_query, T.inv_token_norms(teacher_query, 1)) if normalize else \
            teacher_query.to(acc)
        target = alpha * soft_target_values(th.detach(), kh, s.detach()) + (1 - alpha) * target
    return (lse - s * (qh * target).sum(dim=1)).mean()


if _TRITON_IMPORT_ERROR is None:
    import triton  # noqa: E402

    register("momentum_contrastive", "triton")(functools.partial(momentum_contrastive_fused, impl="triton"))
    register("sinkhorn", "triton")(sinkhorn_fused)
    register("swapped_prediction", "triton")(functools.partial(swapped_prediction_fused, impl="triton"))

# the C++ kernels of csrc/ (offered only when the extension is built; the dispatcher says so otherwise)
for _b in ("cpu", "cuda"):
    register("momentum_contrastive", _b)(functools.partial(momentum_contrastive_fused, impl=_b))
    register("sinkhorn", _b)(functools.partial(sinkhorn_ext, impl=_b))
    register("swapped_prediction", _b)(functools.partial(swapped_prediction_fused, impl=_b))
