"""Contrastive losses over ``torch.distributed`` (NCCL on GPUs, gloo on CPUs); no transport of our own.

Two ways to see the global batch:

* gather (open_clip's ``ClipLoss`` with ``world_size > 1``): all-gather the features, with or without gradient,
  then the fused loss on the gathered batch (``local_loss=True``: only this rank's rows and columns).
* ring (:func:`ring_clip_loss`): text blocks travel around the ring with ``isend``/``irecv``; each rank keeps its
  own O(N_local·d) features, the block in flight and O(N_local) log-sum-exp statistics. Nobody ever holds the
  global features or any global×global matrix. The column statistics of a block travel with it and reach its
  owner after a full turn; in backward the block's gradient accumulator travels the same way.

Gradient convention (both modes, as open_clip's ``gather_with_grad``): every rank returns the global loss, and
its local features receive ``world_size × ∂loss/∂features``, so DDP's gradient averaging yields the gradient of
the global loss.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from . import _validation as V
from .ops import _tiles as T
from .ops.infonce.function import _lse_backward_slabs, _lse_pair_impl


def _world(group) -> Tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call dist.init_process_group first")
    return dist.get_rank(group), dist.get_world_size(group)


def check_equal_local_batches(n_local: int, group=None) -> None:
    """All ranks must hold the same number of pairs (all_gather needs it, and pairs i↔i must share a rank)."""
    _, world = _world(group)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    mine = torch.tensor([n_local], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        mine, sizes = mine.cuda(), [s.cuda() for s in sizes]
    dist.all_gather(sizes, mine, group=group)
    got = [int(s) for s in sizes]
    if len(set(got)) != 1:
        raise ValueError(f"local batches differ across ranks ({got}); every rank must hold the same number of "
                         "image-text pairs (drop the last uneven batch, e.g. DataLoader(drop_last=True))")


class _AllGather(torch.autograd.Function):
    """(world·N, ...) = the ranks' tensors stacked along dim 0; backward sums the ranks' gradients of this rank's
    slice (a reduce-scatter), the semantics of ``torch.distributed.nn.all_gather``, on public c10d calls only
    (that module is deprecated and warns on every call)."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        rank, world = _world(group)
        ctx.group, ctx.rank, ctx.world = group, rank, world
        t = t.contiguous()
        out = t.new_empty((world * t.shape[0],) + tuple(t.shape[1:]))
        dist.all_gather(list(out.chunk(world)), t, group=group)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        g = g.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            mine = g.new_empty((g.shape[0] // ctx.world,) + tuple(g.shape[1:]))
            dist.reduce_scatter_tensor(mine, g, group=ctx.group)
            return mine, None
        g = g.clone()  # gloo has no reduce-scatter: all-reduce, keep this rank's slice
        dist.all_reduce(g, group=ctx.group)
        return g.chunk(ctx.world)[ctx.rank].contiguous(), None


def all_gather_with_grad(t: Tensor, group=None) -> Tensor:
    """Every rank's ``t`` concatenated along dim 0, differentiable (gradients are summed over ranks)."""
    return _AllGather.apply(t, group)


def gather_features(image_features: Tensor, text_features: Tensor, local_loss: bool = False,
                    gather_with_grad: bool = False, group=None) -> Tuple[Tensor, Tensor]:
    """open_clip's gather: with grad (:func:`all_gather_with_grad`), or without, keeping the local slice
    differentiable (``local_loss=False``)."""
    rank, world = _world(group)
    if gather_with_grad:
        return all_gather_with_grad(image_features, group), all_gather_with_grad(text_features, group)
    imgs: List[Tensor] = [torch.zeros_like(image_features) for _ in range(world)]
    txts: List[Tensor] = [torch.zeros_like(text_features) for _ in range(world)]
    dist.all_gather(imgs, image_features.detach(), group=group)
    dist.all_gather(txts, text_features.detach(), group=group)
    if not local_loss:  # keep this rank's slice in the graph, as open_clip does
        imgs[rank], txts[rank] = image_features, text_features
    return torch.cat(imgs), torch.cat(txts)


# ------------------------------------------------------------------------------------------------------ ring
def _shift(tensors: List[Tensor], rank: int, world: int, group) -> List[Tensor]:
    """Send each tensor to rank+1 and receive the same shapes from rank−1 (one ring step)."""
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    out = [torch.empty_like(t) for t in tensors]
    reqs = []
    for t, o in zip(tensors, out):
        reqs.append(dist.isend(t.contiguous(), dist.get_global_rank(group, nxt) if group else nxt, group=group))
        reqs.append(dist.irecv(o, dist.get_global_rank(group, prv) if group else prv, group=group))
    for r in reqs:
        r.wait()
    return out


class _RingInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, group):
        rank, world = _world(group)
        n = x.shape[0]
        acc = T.acc_dtype(x)
        a = scale.to(acc).expand(n).contiguous()
        b = bias.to(acc)
        lse_r = torch.full((n,), float("-inf"), dtype=acc, device=x.device)
        blk, col = y, torch.full((n,), float("-inf"), dtype=acc, device=x.device)
        for step in range(world):
            lr, lc = _lse_pair_impl(x, blk, a, a, b, False, 1, "auto")
            lse_r = torch.logaddexp(lse_r, lr.to(acc))
            col = torch.logaddexp(col, lc.to(acc))
            if step < world - 1:
                blk, col = _shift([blk, col], rank, world, group)
        (lse_c,) = _shift([col], rank, world, group) if world > 1 else (col,)  # home after a full turn
        pos = (x.to(acc) * y.to(acc)).sum(dim=1)
        local = (lse_r - a * pos - b).sum() + (lse_c - a * pos - b).sum()
        total = local.detach().clone()
        dist.all_reduce(total, group=group)
        n_global = n * world
        ctx.save_for_backward(x, y, a, b, lse_r, lse_c, pos)
        ctx.group, ctx.n_global = group, n_global
        return total / (2 * n_global)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, y, a, b, lse_r, lse_c, pos = ctx.saved_tensors
        rank, world = _world(ctx.group)
        n = x.shape[0]
        acc = a.dtype
        # world× so that DDP's averaging of parameter gradients gives the global loss's gradient
        w = (g.to(acc) * world / (2 * ctx.n_global)).expand(n).contiguous()
        use_triton = T.triton_ok(x)
        dx = torch.zeros(n, x.shape[1], dtype=acc, device=x.device)
        da_total = torch.zeros((), dtype=acc, device=x.device)
        blk, blk_lse, blk_dy = y, lse_c, torch.zeros(n, y.shape[1], dtype=acc, device=x.device)
        for step in range(world):
            dxh, dyh, da, dc = _lse_backward_slabs(w, w, x, blk, a, a, b, lse_r, blk_lse, False, 1, use_triton)
            dx += dxh
            blk_dy = blk_dy + dyh
            da_total = da_total + da.sum() + dc.sum()
            if step < world - 1:
                blk, blk_lse, blk_dy = _shift([blk, blk_lse, blk_dy], rank, world, ctx.group)
        (dy,) = _shift([blk_dy], rank, world, ctx.group) if world > 1 else (blk_dy,)
        # the positive terms −a·pos appear once in each direction
        dx = dx - (2 * w * a)[:, None] * y.to(acc)
        dy = dy - (2 * w * a)[:, None] * x.to(acc)
        dscale = da_total - (2 * w * pos).sum()
        # d/d bias: Σ P = Σ Q = 1 per row/column cancels the −b of each term
        return dx.to(x.dtype), dy.to(y.dtype), dscale.reshape(()), torch.zeros_like(b), None


def ring_clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
                   normalize: bool = False, group=None) -> Tensor:
    """CLIP's symmetric InfoNCE over the whole distributed batch, computed around a ring of ranks.

    image_features, text_features: this rank's (N_local, D) pairs (equal N_local on every rank). Returns the
    global loss on every rank. Memory per rank: O(N_local·D) plus one block in flight; never the global batch.
    """
    V.check_features("image_features", image_features, 2)
    V.check_features("text_features", text_features, 2)
    V.check_pair("image_features", image_features, "text_features", text_features, same_batch=True)
    scale = V.as_scalar_tensor("logit_scale", logit_scale, image_features)
    bias = torch.zeros((), device=image_features.device) if logit_bias is None else \
        V.as_scalar_tensor("logit_bias", logit_bias, image_features, positive=False)
    V.check_finite(image_features=image_features, text_features=text_features)
    check_equal_local_batches(image_features.shape[0], group)
    x, y = image_features, text_features
    if normalize:
        x, y = F.normalize(x.float(), dim=-1).to(x.dtype), F.normalize(y.float(), dim=-1).to(y.dtype)
    return _RingInfoNCE.apply(x, y, scale, bias, group)


def ring_available(group: Optional[object] = None) -> bool:
    return dist.is_available() and dist.is_initialized()


# ------------------------------------------------------------------------------------------------- Sinkhorn
@torch.no_grad()
def distributed_sinkhorn(scores: Tensor, epsilon: float = 0.05, n_iters: int = 3, group=None) -> Tensor:
    """SwAV's ``distributed_sinkhorn`` in log space: one balanced assignment of every rank's rows together.

    scores (n_local, K) on each rank -> Q (n_local, K): rows sum to 1, and each code's column sum over *all*
    ranks' rows is N_global/K. The only communication is, per iteration, an all-reduce (max, then sum) of the
    K column statistics; rows stay local. Equal to :func:`fastcontrast.sinkhorn` on the concatenated rows.
    """
    _world(group)
    acc = T.acc_dtype(scores)
    z = scores.to(acc) / epsilon
    k = z.shape[1]
    n_global = torch.tensor(float(z.shape[0]), dtype=acc, device=z.device)
    dist.all_reduce(n_global, group=group)
    log_col = torch.log(n_global / k)
    u = torch.zeros(z.shape[0], dtype=acc, device=z.device)
    for _ in range(n_iters):
        t = z - u[:, None]  # columns: v_k = log(N/K) − log Σ_i exp(z_ik − u_i), the sum over every rank
        m = t.max(dim=0).values if t.shape[0] else torch.full((k,), float("-inf"), dtype=acc, device=z.device)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        ssum = torch.exp(t - m).sum(dim=0)
        dist.all_reduce(ssum, group=group)
        v = log_col - (m + ssum.log())
        u = torch.logsumexp(z + v, dim=1)  # rows: local
    return torch.exp(z + v - u[:, None])
