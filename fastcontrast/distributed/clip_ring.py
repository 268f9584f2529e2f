"""CLIP's symmetric InfoNCE around a ring of ranks (``ClipLoss(mode="ring")``): text blocks travel with
``isend``/``irecv``; each rank keeps its own O(N_local·d) features, the block in flight and O(N_local) log-sum-exp
statistics. Nobody ever holds the global features or any global×global matrix. The column statistics of a block
travel with it and reach its owner after a full turn; in backward the block's gradient accumulator travels the
same way. Every transfer of a step is posted before the step's block compute and waited after it.

Gradient convention (open_clip's ``gather_with_grad``): every rank returns the global loss, and its local features
receive ``world_size × ∂loss/∂features``, so DDP's gradient averaging yields the gradient of the global loss.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .. import _validation as V
from ..dispatch import resolve
from ..primitives import tiles as T
from ..primitives.groups import group_sums
from .comm import GATHER_ALTERNATIVE, all_ids, check_ranks_agree, empties, post, shift_ops, world_of

_TAG_BLK, _TAG_STAT = 0, 8  # CLIP ring message kinds: a block's parts (up to 4), its statistics / gradient


def _ring_pos(yb: Tensor, iid: Tensor, tb: Tensor, r: Tensor, cb: Tensor):
    """The block's target terms T_row = Σ_{u_i = t_j} r_i⟨x_i, y_j⟩ = ⟨x, gx_row⟩ and T_col = Σ_{u_i = t_j}
    c_j⟨x_i, y_j⟩ = ⟨x, gx_col⟩: returns (gx_row, gx_col) (N, D), gx_row_i = r_i Σ_{j∈P(i)} y_j,
    gx_col_i = Σ_{j∈P(i)} c_j y_j, over the block's texts yb (M_b, D) with ids tb and weights cb (M_b,). Group
    sums (primitives/groups.py): no N×M_b mask."""
    y_sum, _ = group_sums(iid, tb, yb)
    yc_sum, _ = group_sums(iid, tb, cb[:, None] * yb)
    return r[:, None] * y_sum, yc_sum


def _ring_pos_dy(x: Tensor, iid: Tensor, tb: Tensor, r: Tensor, cb: Tensor, wr: Tensor, wc: Tensor) -> Tensor:
    """∂(wr·T_row + wc·T_col)/∂y_b (M_b, D) for the block's texts: Σ_{i: u_i = t_j} (wr·r_i + wc·c_j) x_i."""
    xr_sum, _ = group_sums(tb, iid, r[:, None] * x)
    x_sum, _ = group_sums(tb, iid, x)
    return wr * xr_sum + (wc * cb)[:, None] * x_sum


class _RingInfoNCE(torch.autograd.Function):
    """The CLIP ring. Step k: rank r scores block r−k. The next block's transfer is posted before the block's
    compute and waited after it; the block's column statistics (forward) and gradient accumulator (backward)
    change with the compute, so they travel one step later, in the same posted batch as the next block.

    With ids (``iid`` (N,), ``tid`` (M,), ``r`` = 1/k_i, ``c`` = 1/k'_j from the global counts, 0 where a row
    has no positive) a block carries its text ids and c with it, so the targets t_ij = [u_i = t_j]·r_i (rows)
    and ·c_j (columns) are local to the block: the target terms are per-block group sums (:func:`_ring_pos`),
    rows and columns with no positive are masked out of the lse terms, and the backward coefficient of each
    block is softmax − target (the lse slabs with the masked weights, and the group sums)."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, iid, tid, r, c, lse, group):
        rank, world = world_of(group)
        nxt, prv = (rank + 1) % world, (rank - 1) % world
        n, m = x.shape[0], y.shape[0]
        ids = iid is not None
        acc = T.acc_dtype(x)
        a, ac = scale.to(acc).expand(n).contiguous(), scale.to(acc).expand(m).contiguous()
        b = bias.to(acc)
        xa = x.to(acc) if ids else None
        lse_r = torch.full((n,), float("-inf"), dtype=acc, device=x.device)
        gx_row = gx_col = None  # with ids: Σ over blocks of the target terms' x-gradients (N, D)
        blk = [y.contiguous()] + ([tid.contiguous(), c.contiguous()] if ids else [])

        def score(step, blk):  # the block's row statistics here, its column statistics travel on
            nonlocal lse_r, gx_row, gx_col
            lr, lc = lse(x, blk[0], a, ac, b)
            lse_r = torch.logaddexp(lse_r, lr.to(acc))
            if ids:
                gr, gc = _ring_pos(blk[0].to(acc), iid, blk[1], r, blk[2])
                gx_row = gr if gx_row is None else gx_row + gr
                gx_col = gc if gx_col is None else gx_col + gc
            return lc.to(acc)

        lse_c = _ring_pass(blk, _TAG_BLK, (world, nxt, prv, group), x.device, score, torch.logaddexp)
        n_global, m_global = n * world, m * world
        ctx.group, ctx.n_global, ctx.m_global, ctx.ids, ctx.lse = group, n_global, m_global, ids, lse
        if not ids:
            pos = (x.to(acc) * y.to(acc)).sum(dim=1)
            local = (lse_r - a * pos - b).sum() + (lse_c - a * pos - b).sum()
            total = local.detach().clone()
            dist.all_reduce(total, group=group)
            ctx.save_for_backward(x, y, a, b, lse_r, lse_c, pos)
            return total / (2 * n_global)
        # rows (columns) with no positive anywhere add 0 and still count in the mean over N (M) rows
        t_row, t_col = (xa * gx_row).sum(), (xa * gx_col).sum()
        sums = torch.stack([torch.where(r > 0, lse_r - b, 0.0).sum() - a[0] * t_row,
                            torch.where(c > 0, lse_c - b, 0.0).sum() - a[0] * t_col]).detach()
        dist.all_reduce(sums, group=group)
        ctx.save_for_backward(x, y, a, ac, b, lse_r, lse_c, iid, tid, r, c, gx_row, gx_col, t_row, t_col)
        return 0.5 * (sums[0] / n_global + sums[1] / m_global)

    @staticmethod
    def backward(ctx, g: Tensor):
        T.no_double_backward("ring_clip_loss (ClipLoss(mode='ring'))", "ring", GATHER_ALTERNATIVE)
        if ctx.ids:
            x, y, a, ac, b, lse_r, lse_c, iid, tid, r, c, gx_row, gx_col, t_row, t_col = ctx.saved_tensors
        else:
            x, y, a, b, lse_r, lse_c, pos = ctx.saved_tensors
            ac = a
        rank, world = world_of(ctx.group)
        nxt, prv = (rank + 1) % world, (rank - 1) % world
        n = x.shape[0]
        acc = a.dtype
        # world× so that DDP's averaging of parameter gradients gives the global loss's gradient
        wr = g.to(acc) * world / (2 * ctx.n_global)
        wc = g.to(acc) * world / (2 * ctx.m_global)
        w_row = (torch.where(r > 0, wr, 0.0) if ctx.ids else wr.expand(n)).contiguous()
        xa = x.to(acc) if ctx.ids else None
        dx = torch.zeros(n, x.shape[1], dtype=acc, device=x.device)
        da_total = torch.zeros((), dtype=acc, device=x.device)
        blk = [y.contiguous(), lse_c] + ([tid.contiguous(), c.contiguous()] if ctx.ids else [])

        def grad(step, blk):  # dx, da here; the block's dy travels on
            nonlocal dx, da_total
            if ctx.ids:  # softmax − target: the masked lse slabs, and the block's target terms
                w_col = torch.where(blk[3] > 0, wc, 0.0).contiguous()
            else:
                w_col = w_row
            dxh, dyh, da, dc = ctx.lse.backward(w_row, w_col, x, blk[0], a, ac, b, lse_r, blk[1], acc_out=True)
            dx += dxh
            da_total = da_total + da.sum() + dc.sum()
            dyh = dyh.to(acc)
            if ctx.ids:
                dyh = dyh - a[0] * _ring_pos_dy(xa, iid, blk[2], r, blk[3], wr, wc)
            return dyh

        dy = _ring_pass(blk, _TAG_BLK, (world, nxt, prv, ctx.group), x.device, grad, torch.add)
        if ctx.ids:
            dx = dx - a[0] * (wr * gx_row + wc * gx_col)
            dscale = da_total - (wr * t_row + wc * t_col)
        else:  # the positive terms −a·pos appear once in each direction
            dx = dx - (2 * w_row * a)[:, None] * y.to(acc)
            dy = dy - (2 * w_row * a)[:, None] * x.to(acc)
            dscale = da_total - (2 * w_row * pos).sum()
        # d/d bias: Σ P = Σ Q = 1 per row/column cancels the −b of each term (rows without a positive have none)
        return (dx.to(x.dtype), dy.to(y.dtype), dscale.reshape(()), torch.zeros_like(b)) + (None,) * 6


def ring_clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
                   normalize: bool = False, group=None, image_ids: Optional[Tensor] = None,
                   text_ids: Optional[Tensor] = None, backend: str = "auto", text_negatives: Optional[Tensor] = None,
                   false_negative_ids=None, guide_image_features: Optional[Tensor] = None,
                   guide_text_features: Optional[Tensor] = None, guide_text_negatives: Optional[Tensor] = None,
                   guide_margin: float = 0.0, guide_margin_strategy: str = "absolute") -> Tensor:
    """CLIP's symmetric InfoNCE over the whole distributed batch, computed around a ring of ranks.

    image_features, text_features: this rank's (N_local, D) pairs (equal N_local on every rank). Returns the
    global loss on every rank. Memory per rank: O(N_local·D) plus one block in flight; never the global batch.

    ``image_ids`` (N_local,), ``text_ids`` (M_local,) (then M_local may differ from N_local): multiple positives
    as :func:`fastcontrast.clip_loss` with ids (UniCL), ½[mean_i ℓ_i + mean_j ℓ'_j] over the global batch, row
    i's target uniform over every rank's texts with its id. The global counts k_i, k'_j come from one all-gather
    of the ids (N·W ints); each text block carries its ids and 1/k'_j around the ring.

    ``backend``: what scores each block, forward and backward (the dispatcher's op ``lse_pair``): the fused
    ``fastcontrast::lse_pair`` on triton/cpu/cuda, the materialised block with autograd's gradient on
    dense/reference; "auto" decides by the local block size N·M.

    ``text_negatives`` (K_local, D), ``false_negative_ids`` (image_ids (N_local,), text_ids (N_local,)), the guide
    (``guide_image_features``, ``guide_text_features``, ``guide_text_negatives``, ``guide_margin``,
    ``guide_margin_strategy``): as :func:`fastcontrast.clip_loss` on the concatenated batch (every rank's
    negatives and texts are candidates of every image); each block carries its negatives, ids, guide rows and
    column thresholds around the ring (:class:`_RingMasked`). Not with image_ids/text_ids.
    """
    V.check_features("image_features", image_features, 2)
    V.check_features("text_features", text_features, 2)
    V.check_pair("image_features", image_features, "text_features", text_features)
    x, y = image_features, text_features
    n, m = x.shape[0], y.shape[0]
    scale = V.as_scalar_tensor("logit_scale", logit_scale, x)
    bias = torch.zeros((), device=x.device) if logit_bias is None else \
        V.as_scalar_tensor("logit_bias", logit_bias, x, positive=False)
    from ..losses import clip_loss_masked as CM

    # every rank, every call, before any error only some ranks could raise: a ring fed uneven blocks, or blocks
    # with ids (negatives, a guide) on some ranks only, would hang
    neg_rows = text_negatives.shape[0] if isinstance(text_negatives, Tensor) and text_negatives.dim() else 0
    check_ranks_agree((n, m, x.shape[1], neg_rows),
                      (image_ids is not None, text_ids is not None, text_negatives is not None,
                       false_negative_ids is not None, guide_image_features is not None),
                      group, options="image_ids/text_ids given, text_negatives, false_negative_ids, a guide",
                      sizes_label=": images, texts, width, negatives per rank")
    masked = CM.check_args(x, y, image_ids, text_ids, text_negatives, false_negative_ids, guide_image_features,
                           guide_text_features, guide_text_negatives, guide_margin, guide_margin_strategy)
    if masked is not None:
        negatives, fn_ids, guide, margin, strategy, _ = masked
        V.check_finite(image_features=x, text_features=y, text_negatives=negatives)
        return ring_clip_loss_masked(x, y, scale, None if logit_bias is None else bias, normalize, group, negatives,
                                     fn_ids, guide, margin, strategy, backend)
    iid, tid = V.check_ids(image_ids, text_ids, n, m, x)
    if iid is None and n != m:
        raise ValueError(f"image_features has batch {n} but text_features has batch {m}; the ring pairs image i "
                         "with text i (pass image_ids/text_ids for other pairings)")
    V.check_finite(image_features=x, text_features=y)
    r = c = None
    if iid is not None:  # k_i: every rank's texts with image i's id; k'_j: every rank's images with text j's
        with torch.no_grad():
            acc = T.acc_dtype(x)

            def inverse_counts(mine: Tensor, theirs: Tensor) -> Tensor:  # 1/k (0 where k = 0) from sorted ids
                srt = torch.sort(all_ids(theirs, group)).values
                k = (torch.searchsorted(srt, mine, right=True) - torch.searchsorted(srt, mine)).to(acc)
                return torch.where(k > 0, 1.0 / k.clamp_min(1), 0.0)

            r, c = inverse_counts(iid, tid), inverse_counts(tid, iid)
    if normalize:  # in the accumulation dtype: fp32 for half inputs, float64 stays float64
        acc = T.acc_dtype(x)
        x, y = F.normalize(x.to(acc), dim=-1).to(x.dtype), F.normalize(y.to(acc), dim=-1).to(y.dtype)
    # the bias cancels in every softmax (as functional._infonce): computed without it, so a |b| ≫ |s·S| costs no
    # digits; 0·b keeps its exactly-zero gradient and its NaN
    lse = resolve("lse_pair", backend, x.device, n * m, x.dtype)()
    loss = _RingInfoNCE.apply(x, y, scale, torch.zeros((), device=x.device), iid, tid, r, c, lse, group)
    return V.plus_zero_bias(loss, None if logit_bias is None else bias)


# ------------------------------------------------------------------ hard negatives and false-negative masks
_TAG_MBLK = 16  # the masked ring's block parts (up to 4)


class _RingMasked(torch.autograd.Function):
    """The CLIP ring with hard-negative texts and false-negative masks (losses/clip_loss_masked.py has the math).
    A block is rank r's keys [y_r; n_r] (M_l + K_l rows: its texts, then its negatives), with the texts'
    false-negative ids, the guide's rows for them and the texts' guide thresholds thr_c when given; the column
    statistics cover the M_l texts only (negatives enter the image→text softmax only). Row i's positive is text i
    of the rank's own block (step 0: keep = arange there, no kept column in the others). As the plain ring: the
    next block is posted before the block's compute, the statistics (forward) and gradient (backward) travel one
    step behind."""

    @staticmethod
    def forward(ctx, x, keys, scale, m_l, iid, tid, gx, gkeys, thr_r, thr_c, lse, group):
        rank, world = world_of(group)
        nxt, prv = (rank + 1) % world, (rank - 1) % world
        n = x.shape[0]
        acc = T.acc_dtype(x)
        a, ac = scale.to(acc).expand(n).contiguous(), scale.to(acc).expand(keys.shape[0]).contiguous()
        lse_r = torch.full((n,), float("-inf"), dtype=acc, device=x.device)

        def score(step, blk):  # the block's row statistics here, its texts' column statistics travel on
            nonlocal lse_r
            lr, lc = lse(x, blk[0], a, ac, False, _block_masks(blk, step == 0, n, m_l, iid, gx, thr_r))
            lse_r = torch.logaddexp(lse_r, lr.to(acc))
            return lc.to(acc)

        lse_c = _ring_pass(_masked_block(keys, tid, gkeys, thr_c), _TAG_MBLK, (world, nxt, prv, group), x.device,
                           score, torch.logaddexp)
        pos = (x.to(acc) * keys[:m_l].to(acc)).sum(dim=1)
        total = ((lse_r - a * pos).sum() + (lse_c - a[:m_l] * pos).sum()).detach().clone()
        dist.all_reduce(total, group=group)
        ctx.group, ctx.n_global, ctx.m_l, ctx.lse = group, n * world, m_l, lse
        ctx.save_for_backward(x, keys, a, ac, lse_r, lse_c, pos, iid, tid, gx, gkeys, thr_r, thr_c)
        return total / (2 * n * world)

    @staticmethod
    def backward(ctx, g):
        T.no_double_backward("ring_clip_loss with negatives or masks (ClipLoss(mode='ring'))", "ring",
                             GATHER_ALTERNATIVE)
        x, keys, a, ac, lse_r, lse_c, pos, iid, tid, gx, gkeys, thr_r, thr_c = ctx.saved_tensors
        rank, world = world_of(ctx.group)
        nxt, prv = (rank + 1) % world, (rank - 1) % world
        n, m_l = x.shape[0], ctx.m_l
        acc = a.dtype
        w = (g.to(acc) * world / (2 * ctx.n_global)).expand(n).contiguous()  # world×: DDP averages (open_clip)
        dx = torch.zeros(n, x.shape[1], dtype=acc, device=x.device)
        dscale = torch.zeros((), dtype=acc, device=x.device)

        def grad(step, blk):  # dx, ds here; the block's dk travels on
            nonlocal dx, dscale
            masks = _block_masks(blk[:-1], step == 0, n, m_l, iid, gx, thr_r)
            dxh, dkh, da, dc = ctx.lse.backward(w, w[:m_l], x, blk[0], a, ac, False, masks, lse_r, blk[-1],
                                                acc_out=True)
            dx += dxh
            dscale = dscale + da.sum() + dc.sum()
            return dkh.to(acc)

        dk = _ring_pass(_masked_block(keys, tid, gkeys, thr_c) + [lse_c], _TAG_MBLK, (world, nxt, prv, ctx.group),
                        x.device, grad, torch.add)
        # the positive terms −a·pos appear once in each direction
        dx = dx - (2 * w * a)[:, None] * keys[:m_l].to(acc)
        dk[:m_l] -= (2 * w * a)[:, None] * x.to(acc)
        dscale = dscale - (2 * w * pos).sum()
        return (dx.to(x.dtype), dk.to(keys.dtype), dscale.reshape(())) + (None,) * 9


def _masked_block(keys, tid, gkeys, thr_c):
    """The parts of a block that travel: its keys, and the texts' ids, guide rows and thresholds when given."""
    return [keys.contiguous()] + [t.contiguous() for t in (tid, gkeys, thr_c) if t is not None]


def _block_masks(blk, own: bool, n: int, m_l: int, iid, gx, thr_r):
    from ..primitives.lse_masked import Masks

    parts = iter(blk[1:])
    tid = next(parts) if iid is not None else None
    gkeys, thr_c = (next(parts), next(parts)) if gx is not None else (None, None)
    keep = torch.arange(n, device=blk[0].device) if own else None
    return Masks(keep=keep, row_ids=iid, col_ids=tid, exclude_same=iid is not None, guide_x=gx, guide_y=gkeys,
                 guide_normalize=True, thr_r=thr_r, thr_c=thr_c, n_stat=m_l)


def _ring_pass(blk, tag: int, ring, device, compute, combine) -> Tensor:
    """The W steps of one pass of text blocks around the ring (``ring`` = (world, next rank, previous rank, group)).
    Step k: the next block is posted (sent to the next rank, received from the previous one) together with what
    the ranks the held block visited before accumulated for it (from step 1); then ``compute(k, block)`` returns
    this rank's part for the block (its column statistics, its gradient), which after the wait is combined with
    the received part (``combine(received, part)``) and travels one step behind the block. Returns the block's
    total once it is home (block r's arrives after its full turn)."""
    world, nxt, prv, group = ring
    carried = None
    for step in range(world):
        ops, nblk, got = [], None, None
        if step < world - 1:  # the next block, while this one is computed
            nblk = empties(blk)
            ops += shift_ops(blk, nblk, nxt, prv, tag)
        if step > 0:  # what the ranks this block visited before accumulated for it
            got = torch.empty_like(carried)
            ops += shift_ops([carried], [got], nxt, prv, _TAG_STAT)
        pending = post(ops, group, device)
        part = compute(step, blk)
        pending.wait()
        carried = part if got is None else combine(got, part)
        if nblk is not None:
            blk = nblk
    return _home(carried, world, nxt, prv, group, device)


def _home(t: Tensor, world: int, nxt: int, prv: int, group, device) -> Tensor:
    """Block r+1's accumulated part goes home; block r's arrives after its full turn."""
    if world == 1:
        return t
    out = torch.empty_like(t)
    post(shift_ops([t], [out], nxt, prv, _TAG_STAT), group, device).wait()
    return out


def ring_clip_loss_masked(x: Tensor, y: Tensor, scale: Tensor, bias, normalize: bool, group, negatives, fn_ids,
                          guide, margin: float, strategy: str, backend: str) -> Tensor:
    """:func:`ring_clip_loss` with ``text_negatives`` / ``false_negative_ids`` / a guide (checked by the caller):
    the global loss of clip_loss with those arguments on the concatenated batch (every rank's negatives are
    negatives of every image). The blocks run ``fastcontrast::lse_masked`` (the dispatcher's op "lse_masked",
    told the call needs masks: the PyTorch tiles on csrc's backends, whose kernels have none)."""
    from ..losses.clip_loss_masked import guide_thresholds

    n, m = x.shape[0], y.shape[0]
    if n != m:
        raise ValueError(f"image_features has batch {n} but text_features has batch {m}; the ring pairs image i "
                         "with text i")
    acc = T.acc_dtype(x)
    if normalize:  # in the accumulation dtype: fp32 for half inputs, float64 stays float64
        x, y = F.normalize(x.to(acc), dim=-1).to(x.dtype), F.normalize(y.to(acc), dim=-1).to(y.dtype)
        negatives = None if negatives is None else F.normalize(negatives.to(acc), dim=-1).to(negatives.dtype)
    keys = y if negatives is None else torch.cat([y, negatives])
    iid, tid = (None, None) if fn_ids is None else fn_ids
    gx = gkeys = thr_r = thr_c = None
    if guide is not None:
        gx, gkeys = guide[0], guide[1] if guide[2] is None else torch.cat([guide[1], guide[2]])
        thr_r, thr_c = guide_thresholds(guide[0], guide[1], None, m, margin, strategy)
    lse = resolve("lse_masked", backend, x.device, n * keys.shape[0], x.dtype, needs=("masks",))()
    loss = _RingMasked.apply(x, keys, scale, m, iid, tid, gx, gkeys, thr_r, thr_c, lse, group)
    return V.plus_zero_bias(loss, bias)
