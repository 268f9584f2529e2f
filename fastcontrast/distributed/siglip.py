"""open_clip's distributed SigLIP (``SigLipLoss(world_size > 1)``), its four ``dist_impl``: "bidir"/"shift"
pass text blocks neighbour to neighbour, "reduce" sends each block from its owner by a collective, each block
scored by the fused siglip op with one block in memory, forward and backward; "gather" all-gathers the texts.

Returns open_clip's per-rank loss (their mean is the global loss) with open_clip's gradients: after DDP's
averaging, the gradient of the global loss.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .. import _validation as V
from .._amp import autocast_aware
from ..dispatch import resolve
from ..losses.siglip_loss import siglip_ids_terms
from ..primitives import tiles as T
from ..primitives.groups import group_sums
from .comm import (GATHER_ALTERNATIVE, all_gather_with_grad, all_ids, bcast, check_ranks_agree, empties, post,
                   reduce_to, shift_ops, world_of)

SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")
_TAG_R, _TAG_L, _TAG_GR, _TAG_GL = 0, 8, 16, 24  # message kinds (gloo matches tags; every rank posts one order)


def _siglip_block(impl, x: Tensor, yb: Tensor, s: Tensor, b: Tensor, own: bool, ids) -> Tensor:
    """(1/N) Σ_ij −log σ(z_ij (s⟨x_i, y_j⟩ + b)): this rank's N images against one text block yb (M_b, D).

    Without ids (``ids`` None) z = +1 only on the diagonal of the own block; another rank's block is all
    negatives (open_clip's ``negative_only``). With ``ids = (image_ids, block_text_ids, r, c)``: z = +1 where the
    ids are equal, in every block, and r (N,), c (M_b,) are SigLIP+'s 1/k_i, 1/k'_j from the global counts
    (None for weighting "none"): ``losses.siglip_loss.siglip_ids_terms`` on the backend's siglip op."""
    if ids is None:
        return impl(x, yb, s, b, None, not own)
    iid, tid, r, c = ids
    return siglip_ids_terms(impl, x, yb, s, b, iid, tid, r, c)


def _parts(y: Tensor, tid: Optional[Tensor], c: Optional[Tensor]) -> List[Tensor]:
    """What travels as one text block: the features, and with ids their ids and SigLIP+ weights."""
    return [t.contiguous() for t in (y, tid, c) if t is not None]


def _score(impl, x, s, b, iid, r, parts: List[Tensor], own: bool) -> Tensor:
    ids = None if iid is None else (iid, parts[1], r, parts[2] if r is not None else None)
    return _siglip_block(impl, x, parts[0], s, b, own, ids)


def _block_grads(impl, x, parts, s, b, own, iid, r, g):
    """The block's loss recomputed with autograd (the op's own backward): gradients to x, the block, s, b."""
    with torch.enable_grad():
        xg, yg, sg, bg = (t.detach().requires_grad_() for t in (x, parts[0], s, b))
        loss = _score(impl, xg, sg, bg, iid, r, [yg] + parts[1:], own)
        return torch.autograd.grad(loss, (xg, yg, sg, bg), g)


def _ring_step(k, k_r, k_l, cur_r, cur_l, right, left, group, device):
    """Post step k's transfers: the right-moving block to the right, the left-moving one to the left."""
    ops, nr, nl = [], None, None
    if k <= k_r:
        nr = empties(cur_r)
        ops += shift_ops(cur_r, nr, right, left, _TAG_R)
    if k <= k_l:
        nl = empties(cur_l)
        ops += shift_ops(cur_l, nl, left, right, _TAG_L)
    return post(ops, group, device), nr, nl


class _SigLipBlocks(torch.autograd.Function):
    """open_clip's distributed SigLIP (each rank: its images against every rank's text block, positives on its
    own) with one block in memory at a time, forward and backward.

    ``plan`` = ("ring", K_R, K_L): text blocks hop to the right neighbour K_R times and to the left one K_L
    times (shift: W−1, 0; bidir: ⌈(W−1)/2⌉, ⌊(W−1)/2⌋), so rank r scores blocks r−1..r−K_R and r+1..r+K_L.
    ("reduce",): block i reaches every rank by a collective from rank i (open_clip all-reduces the block masked
    to rank i: a broadcast), its gradient goes back summed to rank i (open_clip's all-reduce backward).

    Backward recomputes every block (its op's own backward under enable_grad); only the last block of each ring
    direction is kept from the forward. The ring's gradient runs open_clip's NeighbourExchange backward:
    G_k(r) = g_k(r) + G_{k+1}(r+1) (g_k(r): rank r's gradient for the block it scored at step k; mirrored for
    the left-moving blocks), the blocks and G moving one hop back per step, so G_1 reaches the owner. Each
    step's transfers are posted before the block's compute and waited after it; a step's G, which the compute
    produces, travels with the next step's block.

    Returns this rank's loss (1/N) Σ over its images and all texts, open_clip's value; its text features get
    Σ_s ∂L_s/∂y_r (every rank's loss), its images, scale and bias ∂L_r, as open_clip's autograd gives."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, iid, tid, r, c, impl, plan, group):
        rank, world = world_of(group)
        ctx.impl, ctx.plan, ctx.group = impl, plan, group
        ctx.ids, ctx.weighted = iid is not None, r is not None
        own = _parts(y, tid, c)
        acc = T.acc_dtype(x)

        def score(parts, is_own):
            return _score(impl, x, scale, bias, iid, r, parts, is_own).to(acc)

        if plan[0] == "reduce":
            total, ctx.last = _forward_reduce(score, own, rank, world, group, x.device), (None, None)
        else:
            total, ctx.last = _forward_ring(score, own, plan, rank, world, group, x.device)
        ctx.save_for_backward(x, y, scale, bias, *(t for t in (iid, tid, r, c) if t is not None))
        return total

    @staticmethod
    def backward(ctx, g):
        T.no_double_backward("siglip_distributed_loss (SigLipLoss(dist_impl='bidir'/'shift'/'reduce'))", "ring",
                             GATHER_ALTERNATIVE)
        x, y, scale, bias, *extra = ctx.saved_tensors
        iid, tid = (extra[0], extra[1]) if ctx.ids else (None, None)
        r, c = (extra[2], extra[3]) if ctx.weighted else (None, None)
        group, dev = ctx.group, x.device
        rank, world = world_of(group)
        acc = T.acc_dtype(x)
        dx = torch.zeros(x.shape, dtype=acc, device=dev)
        dsb = [torch.zeros((), dtype=acc, device=dev), torch.zeros((), dtype=acc, device=dev)]
        own = _parts(y, tid, c)

        def grad(parts, is_own):  # this rank's loss's gradient for the block; dx, ds, db are summed here
            gx, gy, gs, gb = _block_grads(ctx.impl, x, parts, scale, bias, is_own, iid, r, g)
            dx.add_(gx.to(acc))
            dsb[0] = dsb[0] + gs.to(acc).sum()
            dsb[1] = dsb[1] + gb.to(acc).sum()
            return gy.to(acc).contiguous()

        if ctx.plan[0] == "reduce":
            dy = _backward_reduce(grad, own, rank, world, group, dev)
        else:
            last, ctx.last = ctx.last, None
            dy = _backward_ring(grad, own, last, ctx.plan, rank, world, group, dev)
        need = ctx.needs_input_grad
        return (dx.to(x.dtype) if need[0] else None, dy.to(y.dtype) if need[1] else None,
                dsb[0].to(scale.dtype).reshape(scale.shape) if need[2] else None,
                dsb[1].to(bias.dtype).reshape(bias.shape) if need[3] else None) + (None,) * 7


def _forward_reduce(score, own, rank, world, group, device):
    """Every rank's block from its owner by a broadcast, the next one in flight while this one is scored."""
    bufs = [own if i == rank else None for i in range(world)]

    def fetch(i):
        bufs[i] = bufs[i] if bufs[i] is not None else empties(own)
        return bcast(bufs[i], i, group, device)

    pending = fetch(0)
    total = score(own, True)
    for i in range(world):
        pending.wait()
        if i + 1 < world:  # the next block travels while this one is scored
            pending = fetch(i + 1)
        if i != rank:
            total = total + score(bufs[i], False)
        bufs[i] = None
    return total


def _forward_ring(score, own, plan, rank, world, group, device):
    """The blocks passed neighbour to neighbour (K_R hops right, K_L left); returns (total, the last blocks)."""
    _, k_r, k_l = plan
    right, left = (rank + 1) % world, (rank - 1) % world
    cur_r = cur_l = own
    pending, nr, nl = _ring_step(1, k_r, k_l, cur_r, cur_l, right, left, group, device)
    total = score(own, True)
    for k in range(1, max(k_r, k_l) + 1):
        pending.wait()
        cur_r = nr if k <= k_r else cur_r
        cur_l = nl if k <= k_l else cur_l
        pending, nr, nl = _ring_step(k + 1, k_r, k_l, cur_r, cur_l, right, left, group, device)
        if k <= k_l:
            total = total + score(cur_l, False)
        if k <= k_r:
            total = total + score(cur_r, False)
    return total, (cur_r if k_r else None, cur_l if k_l else None)


def _backward_reduce(grad, own, rank, world, group, dev):
    """Each block's gradient summed at its owner (a reduce), posted while the next block is scored; returns dy."""
    bufs = [own if i == rank else None for i in range(world)]

    def fetch(i):
        bufs[i] = bufs[i] if bufs[i] is not None else empties(own)
        return bcast(bufs[i], i, group, dev)

    pending, prev, dy = fetch(0), None, None
    for i in range(world):
        pending.wait()
        if i + 1 < world:
            pending = fetch(i + 1)
        gy = grad(bufs[i], i == rank)
        bufs[i] = None
        red = (reduce_to(gy, i, group, dev), gy, i)  # block i's gradients summed at its owner
        if prev is not None:
            prev[0].wait()
            dy = prev[1] if prev[2] == rank else dy
        prev = red
    prev[0].wait()
    return prev[1] if prev[2] == rank else dy


def _backward_ring(grad, own, last, plan, rank, world, group, dev):
    """open_clip's NeighbourExchange backward (the class doc): G_k = g_k + G_{k+1} travelling one hop back per
    step with the blocks, G_1 reaching the owner; returns dy."""
    _, k_r, k_l = plan
    right, left = (rank + 1) % world, (rank - 1) % world
    cur_r, cur_l = last
    mine_r = mine_l = None  # G_{k+1} of this rank, computed in the previous iteration
    for k in range(max(k_r, k_l), 0, -1):
        ops, nr, nl, in_r, in_l = [], None, None, None, None
        if k <= k_r:
            if k > 1:  # block r−k+1, which the right neighbour holds now, is scored next
                nr = empties(cur_r)
                ops += shift_ops(cur_r, nr, left, right, _TAG_R)
            if k < k_r:
                in_r = torch.empty_like(mine_r)
                ops += shift_ops([mine_r], [in_r], left, right, _TAG_GR)
        if k <= k_l:
            if k > 1:
                nl = empties(cur_l)
                ops += shift_ops(cur_l, nl, right, left, _TAG_L)
            if k < k_l:
                in_l = torch.empty_like(mine_l)
                ops += shift_ops([mine_l], [in_l], right, left, _TAG_GL)
        pending = post(ops, group, dev)
        g_l = grad(cur_l, False) if k <= k_l else None
        g_r = grad(cur_r, False) if k <= k_r else None
        pending.wait()
        # G_k = g_k + G_{k+1}, summed into the received buffer (one block fewer alive)
        if g_r is not None:
            mine_r, cur_r = (g_r if in_r is None else in_r.add_(g_r)), nr
        if g_l is not None:
            mine_l, cur_l = (g_l if in_l is None else in_l.add_(g_l)), nl
        g_r = g_l = None
    ops, home_r, home_l = [], None, None  # G_1 goes to the block's owner
    if k_r:
        home_r = torch.empty_like(mine_r)
        ops += shift_ops([mine_r], [home_r], left, right, _TAG_GR)
    if k_l:
        home_l = torch.empty_like(mine_l)
        ops += shift_ops([mine_l], [home_l], right, left, _TAG_GL)
    pending = post(ops, group, dev)
    dy = grad(own, True)
    pending.wait()
    mine_r = mine_l = None
    for h in (home_r, home_l):
        if h is not None:
            dy = dy.add_(h)
    return dy


def _plan(dist_impl: str, world: int):
    if dist_impl == "shift":
        return ("ring", world - 1, 0)
    if dist_impl == "bidir":  # open_clip: ⌊(W−1)/2⌋ two-way exchanges, then one shift if W−1 is odd
        k_l = (world - 1) // 2
        return ("ring", k_l + (world - 1) % 2, k_l)
    return ("reduce",)


@autocast_aware("image_features", "text_features")
def siglip_distributed_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
                            dist_impl: str = "bidir", image_ids: Optional[Tensor] = None,
                            text_ids: Optional[Tensor] = None, weighting: str = "none", backend: str = "auto",
                            group=None) -> Tensor:
    """open_clip's distributed SigLIP loss of this rank: L_r = −(1/N) Σ_{i∈r} Σ_{j∈all ranks} log σ(z_ij u_ij),
    u = s⟨x_i, y_j⟩ + b, z = +1 on the pairs of this rank's diagonal (or, with ids, where ids are equal).

    image_features (N, D), text_features (M, D) (N = M without ids), the same sizes on every rank; returns the
    0-d local loss (the mean over ranks is the loss of one process on the concatenated batch). Gradients as
    open_clip's: text features get Σ_s ∂L_s/∂y_r, so DDP's averaging gives the global loss's gradient.
    ``dist_impl``: "bidir"/"shift" pass text blocks neighbour to neighbour (both ways / one way), "reduce"
    sends each block by a collective from its owner; all three hold one block (two while one travels), forward
    and backward, each scored by the fused siglip op, transfers overlapped with the block compute. "gather"
    all-gathers the texts (memory grows with the world size). ``image_ids``/``text_ids``/``weighting`` as in
    :func:`fastcontrast.siglip_loss`, the ids travelling with their block; "inverse_count" counts every rank's
    ids (one all-gather of the ids).
    """
    V.check_features("image_features", image_features, 2)
    V.check_features("text_features", text_features, 2)
    V.check_pair("image_features", image_features, "text_features", text_features)
    if dist_impl not in SIGLIP_DIST_IMPLS:
        raise ValueError(f"dist_impl must be one of {', '.join(SIGLIP_DIST_IMPLS)}; got {dist_impl!r}")
    if weighting not in ("none", "inverse_count"):
        raise ValueError(f"weighting must be 'none' or 'inverse_count' (SigLIP+), got {weighting!r}")
    x, y = image_features, text_features
    n, m = x.shape[0], y.shape[0]
    scale = V.as_scalar_tensor("logit_scale", logit_scale, x)
    bias = torch.zeros((), device=x.device) if logit_bias is None else \
        V.as_scalar_tensor("logit_bias", logit_bias, x, positive=False)
    rank, world = world_of(group)
    # every rank, every call, before any check that could fail on one rank only (ids given on one rank): a ring
    # fed uneven blocks would hang, and so would a check only some ranks make
    check_ranks_agree((n, m, x.shape[1]), (image_ids is not None, text_ids is not None,
                                            ("none", "inverse_count").index(weighting),
                                            SIGLIP_DIST_IMPLS.index(dist_impl)), group,
                       options="image_ids given, text_ids given, weighting, dist_impl")
    iid, tid = V.check_ids(image_ids, text_ids, n, m, x)
    if iid is None and weighting != "none":
        raise ValueError("weighting='inverse_count' needs image_ids and text_ids (the groups of positives)")
    if iid is None and n != m:
        raise ValueError(f"SigLipLoss pairs image i with text i: got {n} images and {m} texts per rank "
                         "(use image_ids/text_ids for other pairings)")
    V.check_finite(image_features=x, text_features=y)
    r = c = None
    if weighting == "inverse_count":  # k_i, k'_j count the positives on every rank
        with torch.no_grad():
            acc = T.acc_dtype(x)
            all_iid, all_tid = all_ids(iid, group), all_ids(tid, group)
            _, k_row = group_sums(iid, all_tid, torch.ones(all_tid.shape[0], 1, dtype=acc, device=x.device))
            _, k_col = group_sums(tid, all_iid, torch.ones(all_iid.shape[0], 1, dtype=acc, device=x.device))
            r, c = 1.0 / k_row.clamp_min(1), 1.0 / k_col.clamp_min(1)
    if dist_impl == "gather":  # open_clip's: every rank's texts at once, through an all-gather with gradient
        impl = resolve("siglip", backend, x.device, n * m * world, x.dtype)
        all_y = all_gather_with_grad(y, group)
        if iid is None:
            labels = torch.arange(n, device=x.device) + n * rank
            return impl(x, all_y, scale, bias, labels, False)
        all_tid = all_ids(tid, group)
        all_c = None if c is None else all_ids(c, group)
        return _siglip_block(impl, x, all_y, scale, bias, True, (iid, all_tid, r, all_c))
    impl = resolve("siglip", backend, x.device, n * m, x.dtype)  # float64 keeps a float64 path
    return _SigLipBlocks.apply(x, y, scale, bias, iid, tid, r, c, impl, _plan(dist_impl, world), group)
