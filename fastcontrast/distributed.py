"""Contrastive losses over ``torch.distributed`` (NCCL on GPUs, gloo on CPUs); no transport of our own.

Two ways to see the global batch:

* gather (open_clip's ``ClipLoss`` with ``world_size > 1``): all-gather the features, with or without gradient,
  then the fused loss on the gathered batch (``local_loss=True``: only this rank's rows and columns).
* ring (:func:`ring_clip_loss`): text blocks travel around the ring with ``isend``/``irecv``; each rank keeps its
  own O(N_local·d) features, the block in flight and O(N_local) log-sum-exp statistics. Nobody ever holds the
  global features or any global×global matrix. The column statistics of a block travel with it and reach its
  owner after a full turn; in backward the block's gradient accumulator travels the same way.

SigLIP (:func:`siglip_distributed_loss`, behind ``SigLipLoss(world_size > 1)``) has open_clip's four
``dist_impl``: "bidir"/"shift" pass text blocks neighbour to neighbour, "reduce" sends each block from its owner
by a collective, each block scored by the fused op, one block in memory, forward and backward; "gather"
all-gathers.

Every transfer of a ring step is posted (one ``batch_isend_irecv``; on NCCL from a side CUDA stream) before the
step's block compute and waited after it, so communication overlaps compute; what the compute produces (column
statistics, gradient accumulators) travels with the next step's block.

Gradient convention (CLIP, as open_clip's ``gather_with_grad``): every rank returns the global loss, and
its local features receive ``world_size × ∂loss/∂features``, so DDP's gradient averaging yields the gradient of
the global loss. SigLIP returns open_clip's per-rank loss (their mean is the global loss) with open_clip's
gradients, the same convention after DDP's averaging.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from . import _validation as V
from ._amp import autocast_aware
from .ops import _tiles as T
from .ops import multipos as MP
from .ops.infonce.function import _lse_backward_slabs, _lse_pair_impl


def _world(group) -> Tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call dist.init_process_group first")
    return dist.get_rank(group), dist.get_world_size(group)


_HOST_GROUPS: dict = {}


def _host_group(group):
    """A gloo group over ``group``'s ranks, made once per group: the per-call agreement checks then run between
    the hosts' CPUs and never wait on (or sync) a GPU stream, as an all-gather on an NCCL group would. Without
    gloo the group itself is used, with tensors on the current CUDA device."""
    if dist.get_backend(group) == "gloo" or not dist.is_gloo_available():
        return group
    # the default group's identity too: after destroy_process_group and a new init, the old side groups are dead
    key = (id(group) if group is not None else None, id(dist.group.WORLD))
    g = _HOST_GROUPS.get(key)
    if g is None:  # every member rank reaches this at its first distributed loss call: the same collective
        ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
        g = _HOST_GROUPS[key] = dist.new_group(ranks=sorted(ranks), backend="gloo",
                                               use_local_synchronization=True)
    return g


def _all_gather_ints(values, group):
    """Every rank's int64 vector ``values`` (same length on every rank), gathered on the host."""
    _, world = _world(group)
    host = _host_group(group)
    mine = torch.tensor(list(values), dtype=torch.int64)
    if dist.get_backend(host) != "gloo":
        mine = mine.cuda()
    got = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(got, mine, group=host)
    return [tuple(int(v) for v in g) for g in got]


def check_equal_local_batches(n_local, group=None) -> None:
    """All ranks must hold the same local sizes (all_gather needs it, pairs i↔i must share a rank, and a ring's
    receive buffers are shaped like the sender's block). ``n_local``: an int, or a tuple of ints (e.g. images,
    texts, feature width) compared as a whole. Every rank raises the same ValueError, so none is left waiting.
    Called on every step (a rank whose size changed while the others' did not must meet them in the same
    collective), over a gloo group of the same ranks: one all-gather of a few ints between the hosts per call,
    no GPU sync."""
    _check_ranks_agree(n_local if isinstance(n_local, (tuple, list)) else [n_local], (), group, sizes_label="")


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
        # through a Function of its own, so that a gradient of this gradient (create_graph=True) is exact too
        return _ReduceScatter.apply(g, ctx.group), None


class _ReduceScatter(torch.autograd.Function):
    """(N, ...) = this rank's slice of the ranks' (world·N, ...) tensors summed: the adjoint of :class:`_AllGather`
    (and its backward an all-gather), so double backward through a gather is exact."""

    @staticmethod
    def forward(ctx, g: Tensor, group) -> Tensor:
        rank, world = _world(group)
        ctx.group = group
        g = g.contiguous()
        if dist.get_backend(group) == "nccl":
            mine = g.new_empty((g.shape[0] // world,) + tuple(g.shape[1:]))
            dist.reduce_scatter_tensor(mine, g, group=group)
            return mine
        g = g.clone()  # gloo has no reduce-scatter: all-reduce, keep this rank's slice
        dist.all_reduce(g, group=group)
        return g.chunk(world)[rank].contiguous()

    @staticmethod
    def backward(ctx, h: Tensor):
        return _AllGather.apply(h, ctx.group), None


# the distributed modes whose backward is autograd's own (gathers with exact adjoints): double backward works there
_GATHER_ALTERNATIVE = "ClipLoss(mode='gather') / SigLipLoss(dist_impl='gather') with backend='reference'"


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


# ------------------------------------------------------------------------------------------------------- P2P
_COMM_STREAMS = {}


def _comm_stream(device: torch.device):
    """The side stream this device's ring transfers are issued on (NCCL only; one per device, made once)."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    s = _COMM_STREAMS.get(key)
    if s is None:
        s = _COMM_STREAMS[key] = torch.cuda.Stream(device=torch.device("cuda", key))
    return s


class _Pending:
    """Transfers in flight; :meth:`wait` makes their results safe to read on the current stream."""

    def __init__(self, reqs, stream=None):
        self.reqs, self.stream = reqs, stream

    def wait(self) -> None:
        for r in self.reqs:
            r.wait()
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
        self.reqs = []


def _post(ops, group, device: torch.device) -> _Pending:
    """Start point-to-point transfers without waiting: ``ops`` = [(send?, tensor, peer (rank in group), tag)].

    One ``batch_isend_irecv`` (a single NCCL group call). Every rank posts the same sequence, so sends and
    receives between two ranks pair up in order (gloo also matches the tags). On NCCL they are issued from a side
    stream that first waits for the tensors to be written, so the block compute that follows on the current stream
    runs beside them; the received tensors are read only after :meth:`_Pending.wait`."""
    if not ops:
        return _Pending([])
    p2p = [dist.P2POp(dist.isend if send else dist.irecv, t, _global_rank(group, peer), group=group, tag=tag)
           for send, t, peer, tag in ops]
    return _launch(lambda: dist.batch_isend_irecv(p2p), [t for _, t, _, _ in ops], group, device)


def _global_rank(group, r: int) -> int:
    return r if group is None else dist.get_global_rank(group, r)


def _launch(issue, tensors: List[Tensor], group, device: torch.device) -> _Pending:
    """``issue()`` (returning its async works), on the side stream on NCCL, so the caller's compute overlaps it."""
    if device.type == "cuda" and dist.get_backend(group) == "nccl":
        stream = _comm_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))  # what is sent has been written
        with torch.cuda.stream(stream):
            reqs = issue()
        for t in tensors:  # the caching allocator must not hand these out while the side stream uses them
            t.record_stream(stream)
        return _Pending(list(reqs), stream)
    return _Pending(list(issue()))


def _shift_ops(send: List[Tensor], recv: List[Tensor], to: int, frm: int, tag: int):
    return [(True, t, to, tag + i) for i, t in enumerate(send)] + [(False, t, frm, tag + i) for i, t in enumerate(recv)]


# ------------------------------------------------------------------------------------------------------ ring
_TAG_BLK, _TAG_STAT = 0, 8  # CLIP ring message kinds: a block's parts (up to 4), its statistics / gradient


def _ring_pos(yb: Tensor, iid: Tensor, tb: Tensor, r: Tensor, cb: Tensor):
    """The block's target terms T_row = Σ_{u_i = t_j} r_i⟨x_i, y_j⟩ = ⟨x, gx_row⟩ and T_col = Σ_{u_i = t_j}
    c_j⟨x_i, y_j⟩ = ⟨x, gx_col⟩: returns (gx_row, gx_col) (N, D), gx_row_i = r_i Σ_{j∈P(i)} y_j,
    gx_col_i = Σ_{j∈P(i)} c_j y_j, over the block's texts yb (M_b, D) with ids tb and weights cb (M_b,). Group
    sums (ops/multipos.py): no N×M_b mask."""
    y_sum, _ = MP.group_sums(iid, tb, yb)
    yc_sum, _ = MP.group_sums(iid, tb, cb[:, None] * yb)
    return r[:, None] * y_sum, yc_sum


def _ring_pos_dy(x: Tensor, iid: Tensor, tb: Tensor, r: Tensor, cb: Tensor, wr: Tensor, wc: Tensor) -> Tensor:
    """∂(wr·T_row + wc·T_col)/∂y_b (M_b, D) for the block's texts: Σ_{i: u_i = t_j} (wr·r_i + wc·c_j) x_i."""
    xr_sum, _ = MP.group_sums(tb, iid, r[:, None] * x)
    x_sum, _ = MP.group_sums(tb, iid, x)
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
    def forward(ctx, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, iid, tid, r, c, group):
        rank, world = _world(group)
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
        col = None  # the accumulated column lse of the block held one step ago
        for step in range(world):
            ops, nblk, ncol = [], None, None
            if step < world - 1:  # the next block, while this one is scored
                nblk = _empties(blk)
                ops += _shift_ops(blk, nblk, nxt, prv, _TAG_BLK)
            if step > 0:  # the statistics of this block, accumulated by the ranks it visited before
                ncol = torch.empty_like(col)
                ops += _shift_ops([col], [ncol], nxt, prv, _TAG_STAT)
            pending = _post(ops, group, x.device)
            lr, lc = _lse_pair_impl(x, blk[0], a, ac, b, False, 1, "auto")
            lse_r = torch.logaddexp(lse_r, lr.to(acc))
            if ids:
                gr, gc = _ring_pos(blk[0].to(acc), iid, blk[1], r, blk[2])
                gx_row = gr if gx_row is None else gx_row + gr
                gx_col = gc if gx_col is None else gx_col + gc
            pending.wait()
            col = lc.to(acc) if ncol is None else torch.logaddexp(ncol, lc.to(acc))
            if nblk is not None:
                blk = nblk
        if world > 1:  # block r+1's statistics go home; block r's arrive after their full turn
            lse_c = torch.empty_like(col)
            _post(_shift_ops([col], [lse_c], nxt, prv, _TAG_STAT), group, x.device).wait()
        else:
            lse_c = col
        n_global, m_global = n * world, m * world
        ctx.group, ctx.n_global, ctx.m_global, ctx.ids = group, n_global, m_global, ids
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
        T.no_double_backward("ring_clip_loss (ClipLoss(mode='ring'))", "ring", _GATHER_ALTERNATIVE)
        if ctx.ids:
            x, y, a, ac, b, lse_r, lse_c, iid, tid, r, c, gx_row, gx_col, t_row, t_col = ctx.saved_tensors
        else:
            x, y, a, b, lse_r, lse_c, pos = ctx.saved_tensors
            ac = a
        rank, world = _world(ctx.group)
        nxt, prv = (rank + 1) % world, (rank - 1) % world
        n = x.shape[0]
        acc = a.dtype
        # world× so that DDP's averaging of parameter gradients gives the global loss's gradient
        wr = g.to(acc) * world / (2 * ctx.n_global)
        wc = g.to(acc) * world / (2 * ctx.m_global)
        w_row = (torch.where(r > 0, wr, 0.0) if ctx.ids else wr.expand(n)).contiguous()
        xa = x.to(acc) if ctx.ids else None
        use_triton = T.triton_ok(x)
        dx = torch.zeros(n, x.shape[1], dtype=acc, device=x.device)
        da_total = torch.zeros((), dtype=acc, device=x.device)
        blk = [y.contiguous(), lse_c] + ([tid.contiguous(), c.contiguous()] if ctx.ids else [])
        blk_dy = None
        for step in range(world):
            ops, nblk, ndy = [], None, None
            if step < world - 1:
                nblk = _empties(blk)
                ops += _shift_ops(blk, nblk, nxt, prv, _TAG_BLK)
            if step > 0:
                ndy = torch.empty_like(blk_dy)
                ops += _shift_ops([blk_dy], [ndy], nxt, prv, _TAG_STAT)
            pending = _post(ops, ctx.group, x.device)
            if ctx.ids:  # softmax − target: the masked lse slabs, and the block's target terms
                w_col = torch.where(blk[3] > 0, wc, 0.0).contiguous()
            else:
                w_col = w_row
            dxh, dyh, da, dc = _lse_backward_slabs(w_row, w_col, x, blk[0], a, ac, b, lse_r, blk[1], False, 1,
                                                   use_triton)
            dx += dxh
            da_total = da_total + da.sum() + dc.sum()
            dyh = dyh.to(acc)
            if ctx.ids:
                dyh = dyh - a[0] * _ring_pos_dy(xa, iid, blk[2], r, blk[3], wr, wc)
            pending.wait()
            blk_dy = dyh if ndy is None else ndy + dyh
            if nblk is not None:
                blk = nblk
        if world > 1:
            dy = torch.empty_like(blk_dy)
            _post(_shift_ops([blk_dy], [dy], nxt, prv, _TAG_STAT), ctx.group, x.device).wait()
        else:
            dy = blk_dy
        if ctx.ids:
            dx = dx - a[0] * (wr * gx_row + wc * gx_col)
            dscale = da_total - (wr * t_row + wc * t_col)
        else:  # the positive terms −a·pos appear once in each direction
            dx = dx - (2 * w_row * a)[:, None] * y.to(acc)
            dy = dy - (2 * w_row * a)[:, None] * x.to(acc)
            dscale = da_total - (2 * w_row * pos).sum()
        # d/d bias: Σ P = Σ Q = 1 per row/column cancels the −b of each term (rows without a positive have none)
        return (dx.to(x.dtype), dy.to(y.dtype), dscale.reshape(()), torch.zeros_like(b)) + (None,) * 5


def ring_clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
                   normalize: bool = False, group=None, image_ids: Optional[Tensor] = None,
                   text_ids: Optional[Tensor] = None) -> Tensor:
    """CLIP's symmetric InfoNCE over the whole distributed batch, computed around a ring of ranks.

    image_features, text_features: this rank's (N_local, D) pairs (equal N_local on every rank). Returns the
    global loss on every rank. Memory per rank: O(N_local·D) plus one block in flight; never the global batch.

    ``image_ids`` (N_local,), ``text_ids`` (M_local,) (then M_local may differ from N_local): multiple positives
    as :func:`fastcontrast.clip_loss` with ids (UniCL), ½[mean_i ℓ_i + mean_j ℓ'_j] over the global batch, row
    i's target uniform over every rank's texts with its id. The global counts k_i, k'_j come from one all-gather
    of the ids (N·W ints); each text block carries its ids and 1/k'_j around the ring.
    """
    V.check_features("image_features", image_features, 2)
    V.check_features("text_features", text_features, 2)
    V.check_pair("image_features", image_features, "text_features", text_features)
    x, y = image_features, text_features
    n, m = x.shape[0], y.shape[0]
    scale = V.as_scalar_tensor("logit_scale", logit_scale, x)
    bias = torch.zeros((), device=x.device) if logit_bias is None else \
        V.as_scalar_tensor("logit_bias", logit_bias, x, positive=False)
    # every rank, every call, before any error only some ranks could raise: a ring fed uneven blocks, or blocks
    # with ids on some ranks only, would hang
    _check_ranks_agree((n, m, x.shape[1]), (image_ids is not None, text_ids is not None), group,
                       options="image_ids/text_ids given")
    iid, tid = MP.check_ids(image_ids, text_ids, n, m, x)
    if iid is None and n != m:
        raise ValueError(f"image_features has batch {n} but text_features has batch {m}; the ring pairs image i "
                         "with text i (pass image_ids/text_ids for other pairings)")
    V.check_finite(image_features=x, text_features=y)
    r = c = None
    if iid is not None:  # k_i: every rank's texts with image i's id; k'_j: every rank's images with text j's
        with torch.no_grad():
            acc = T.acc_dtype(x)

            def inverse_counts(mine: Tensor, theirs: Tensor) -> Tensor:  # 1/k (0 where k = 0) from sorted ids
                srt = torch.sort(_all_ids(theirs, group)).values
                k = (torch.searchsorted(srt, mine, right=True) - torch.searchsorted(srt, mine)).to(acc)
                return torch.where(k > 0, 1.0 / k.clamp_min(1), 0.0)

            r, c = inverse_counts(iid, tid), inverse_counts(tid, iid)
    if normalize:  # in the accumulation dtype: fp32 for half inputs, float64 stays float64
        acc = T.acc_dtype(x)
        x, y = F.normalize(x.to(acc), dim=-1).to(x.dtype), F.normalize(y.to(acc), dim=-1).to(y.dtype)
    # the bias cancels in every softmax (as functional._infonce): computed without it, so a |b| ≫ |s·S| costs no
    # digits; 0·b keeps its exactly-zero gradient and its NaN
    loss = _RingInfoNCE.apply(x, y, scale, torch.zeros((), device=x.device), iid, tid, r, c, group)
    return V.plus_zero_bias(loss, None if logit_bias is None else bias)


def ring_available(group: Optional[object] = None) -> bool:
    return dist.is_available() and dist.is_initialized()


# --------------------------------------------------------------------------------------------------- SigLIP
SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")
_TAG_R, _TAG_L, _TAG_GR, _TAG_GL = 0, 8, 16, 24  # message kinds (gloo matches tags; every rank posts one order)


def _siglip_block(impl, x: Tensor, yb: Tensor, s: Tensor, b: Tensor, own: bool, ids) -> Tensor:
    """(1/N) Σ_ij −log σ(z_ij (s⟨x_i, y_j⟩ + b)): this rank's N images against one text block yb (M_b, D).

    Without ids (``ids`` None) z = +1 only on the diagonal of the own block; another rank's block is all
    negatives (open_clip's ``negative_only``). With ``ids = (image_ids, block_text_ids, r, c)``: z = +1 where the
    ids are equal, in every block, and r (N,), c (M_b,) are SigLIP+'s 1/k_i, 1/k'_j from the global counts
    (None for weighting "none"). The all-pairs softplus sum is the backend's siglip op; the positives' terms
    are group sums (ops/multipos.py), so no N×M_b mask exists."""
    if ids is None:
        return impl(x, yb, s, b, None, not own)
    iid, tid, r, c = ids
    acc = T.acc_dtype(x)
    n = x.shape[0]
    sa, ba = s.to(acc), b.to(acc)
    every = impl(x, yb, s, b, None, True)
    xa, ya = x.to(acc), yb.to(acc)
    y_sum, k_row = MP.group_sums(iid, tid, ya)  # the block's positives of each image: Σ y_j, their number
    if r is None:
        return every - (sa * (xa * y_sum).sum() + ba * k_row.sum()) / n
    x_sum, k_col = MP.group_sums(tid, iid, xa)
    linear = 0.5 * ((r * (sa * (xa * y_sum).sum(dim=1) + ba * k_row)).sum()
                    + (c * (sa * (ya * x_sum).sum(dim=1) + ba * k_col)).sum())
    nonlinear = MP._PositiveSoftplus.apply(x, yb, sa, ba, iid, tid, r, c)
    return every + (nonlinear - linear) / n


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


def _empties(parts: List[Tensor]) -> List[Tensor]:
    return [torch.empty_like(t) for t in parts]


def _bcast(parts: List[Tensor], src: int, group, device) -> _Pending:
    return _launch(lambda: [dist.broadcast(t, _global_rank(group, src), group=group, async_op=True) for t in parts],
                   parts, group, device)


def _reduce_to(t: Tensor, dst: int, group, device) -> _Pending:
    return _launch(lambda: [dist.reduce(t, _global_rank(group, dst), group=group, async_op=True)], [t], group,
                   device)


def _ring_step(k, k_r, k_l, cur_r, cur_l, right, left, group, device):
    """Post step k's transfers: the right-moving block to the right, the left-moving one to the left."""
    ops, nr, nl = [], None, None
    if k <= k_r:
        nr = _empties(cur_r)
        ops += _shift_ops(cur_r, nr, right, left, _TAG_R)
    if k <= k_l:
        nl = _empties(cur_l)
        ops += _shift_ops(cur_l, nl, left, right, _TAG_L)
    return _post(ops, group, device), nr, nl


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
        rank, world = _world(group)
        ctx.impl, ctx.plan, ctx.group = impl, plan, group
        ctx.ids, ctx.weighted = iid is not None, r is not None
        own = _parts(y, tid, c)
        acc = T.acc_dtype(x)

        def score(parts, is_own):
            return _score(impl, x, scale, bias, iid, r, parts, is_own).to(acc)

        if plan[0] == "reduce":
            bufs = [own if i == rank else None for i in range(world)]

            def fetch(i):
                bufs[i] = bufs[i] if bufs[i] is not None else _empties(own)
                return _bcast(bufs[i], i, group, x.device)

            pending = fetch(0)
            total = score(own, True)
            for i in range(world):
                pending.wait()
                if i + 1 < world:  # the next block travels while this one is scored
                    pending = fetch(i + 1)
                if i != rank:
                    total = total + score(bufs[i], False)
                bufs[i] = None
            ctx.last = (None, None)
        else:
            _, k_r, k_l = plan
            right, left = (rank + 1) % world, (rank - 1) % world
            cur_r = cur_l = own
            pending, nr, nl = _ring_step(1, k_r, k_l, cur_r, cur_l, right, left, group, x.device)
            total = score(own, True)
            for k in range(1, max(k_r, k_l) + 1):
                pending.wait()
                cur_r = nr if k <= k_r else cur_r
                cur_l = nl if k <= k_l else cur_l
                pending, nr, nl = _ring_step(k + 1, k_r, k_l, cur_r, cur_l, right, left, group, x.device)
                if k <= k_l:
                    total = total + score(cur_l, False)
                if k <= k_r:
                    total = total + score(cur_r, False)
            ctx.last = (cur_r if k_r else None, cur_l if k_l else None)
        ctx.save_for_backward(x, y, scale, bias, *(t for t in (iid, tid, r, c) if t is not None))
        return total

    @staticmethod
    def backward(ctx, g):
        T.no_double_backward("siglip_distributed_loss (SigLipLoss(dist_impl='bidir'/'shift'/'reduce'))", "ring",
                             _GATHER_ALTERNATIVE)
        x, y, scale, bias, *extra = ctx.saved_tensors
        iid, tid = (extra[0], extra[1]) if ctx.ids else (None, None)
        r, c = (extra[2], extra[3]) if ctx.weighted else (None, None)
        group, dev = ctx.group, x.device
        rank, world = _world(group)
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
            bufs = [own if i == rank else None for i in range(world)]

            def fetch(i):
                bufs[i] = bufs[i] if bufs[i] is not None else _empties(own)
                return _bcast(bufs[i], i, group, dev)

            pending, prev, dy = fetch(0), None, None
            for i in range(world):
                pending.wait()
                if i + 1 < world:
                    pending = fetch(i + 1)
                gy = grad(bufs[i], i == rank)
                bufs[i] = None
                red = (_reduce_to(gy, i, group, dev), gy, i)  # block i's gradients summed at its owner
                if prev is not None:
                    prev[0].wait()
                    dy = prev[1] if prev[2] == rank else dy
                prev = red
            prev[0].wait()
            dy = prev[1] if prev[2] == rank else dy
        else:
            _, k_r, k_l = ctx.plan
            right, left = (rank + 1) % world, (rank - 1) % world
            cur_r, cur_l = ctx.last
            ctx.last = None
            mine_r = mine_l = None  # G_{k+1} of this rank, computed in the previous iteration
            for k in range(max(k_r, k_l), 0, -1):
                ops, nr, nl, in_r, in_l = [], None, None, None, None
                if k <= k_r:
                    if k > 1:  # block r−k+1, which the right neighbour holds now, is scored next
                        nr = _empties(cur_r)
                        ops += _shift_ops(cur_r, nr, left, right, _TAG_R)
                    if k < k_r:
                        in_r = torch.empty_like(mine_r)
                        ops += _shift_ops([mine_r], [in_r], left, right, _TAG_GR)
                if k <= k_l:
                    if k > 1:
                        nl = _empties(cur_l)
                        ops += _shift_ops(cur_l, nl, right, left, _TAG_L)
                    if k < k_l:
                        in_l = torch.empty_like(mine_l)
                        ops += _shift_ops([mine_l], [in_l], right, left, _TAG_GL)
                pending = _post(ops, group, dev)
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
                ops += _shift_ops([mine_r], [home_r], left, right, _TAG_GR)
            if k_l:
                home_l = torch.empty_like(mine_l)
                ops += _shift_ops([mine_l], [home_l], right, left, _TAG_GL)
            pending = _post(ops, group, dev)
            dy = grad(own, True)
            pending.wait()
            mine_r = mine_l = None
            for h in (home_r, home_l):
                if h is not None:
                    dy = dy.add_(h)
        need = ctx.needs_input_grad
        return (dx.to(x.dtype) if need[0] else None, dy.to(y.dtype) if need[1] else None,
                dsb[0].to(scale.dtype).reshape(scale.shape) if need[2] else None,
                dsb[1].to(bias.dtype).reshape(bias.shape) if need[3] else None) + (None,) * 7


def _check_ranks_agree(sizes, flags, group, options: str = "image_ids/text_ids given, weighting, dist_impl",
                       sizes_label: str = ": images, texts, width per rank") -> None:
    """One all-gather: the local sizes (:func:`check_equal_local_batches`; ``sizes_label`` names them in the
    error) and the call's options (``options`` names them: SigLIP's ids given, weighting, dist_impl; the CLIP
    ring's ids given), which set what travels; every rank raises the same ValueError when they differ."""
    rows = _all_gather_ints(list(sizes) + [int(f) for f in flags], group)
    k = len(sizes)
    if len({r[:k] for r in rows}) != 1:
        got = [r[0] if k == 1 else r[:k] for r in rows]
        raise ValueError(f"local batches differ across ranks ({got}{sizes_label}); every rank must hold the same "
                         "number of image-text pairs (drop the last uneven batch, e.g. DataLoader(drop_last=True))")
    if len({r[k:] for r in rows}) != 1:
        raise ValueError(f"the ranks called the loss with different options ({options} per rank: "
                         f"{[r[k:] for r in rows]}); every rank must make the same call")


def _plan(dist_impl: str, world: int):
    if dist_impl == "shift":
        return ("ring", world - 1, 0)
    if dist_impl == "bidir":  # open_clip: ⌊(W−1)/2⌋ two-way exchanges, then one shift if W−1 is odd
        k_l = (world - 1) // 2
        return ("ring", k_l + (world - 1) % 2, k_l)
    return ("reduce",)


def _all_ids(ids: Tensor, group) -> Tensor:
    _, world = _world(group)
    out = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(out, ids.contiguous(), group=group)
    return torch.cat(out)


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
    from .dispatch import resolve

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
    rank, world = _world(group)
    # every rank, every call, before any check that could fail on one rank only (ids given on one rank): a ring
    # fed uneven blocks would hang, and so would a check only some ranks make
    _check_ranks_agree((n, m, x.shape[1]), (image_ids is not None, text_ids is not None,
                                            ("none", "inverse_count").index(weighting),
                                            SIGLIP_DIST_IMPLS.index(dist_impl)), group,
                       options="image_ids given, text_ids given, weighting, dist_impl")
    iid, tid = MP.check_ids(image_ids, text_ids, n, m, x)
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
            all_iid, all_tid = _all_ids(iid, group), _all_ids(tid, group)
            _, k_row = MP.group_sums(iid, all_tid, torch.ones(all_tid.shape[0], 1, dtype=acc, device=x.device))
            _, k_col = MP.group_sums(tid, all_iid, torch.ones(all_iid.shape[0], 1, dtype=acc, device=x.device))
            r, c = 1.0 / k_row.clamp_min(1), 1.0 / k_col.clamp_min(1)
    if dist_impl == "gather":  # open_clip's: every rank's texts at once, through an all-gather with gradient
        _, impl = resolve("siglip", backend, x.device, n * m * world, x.dtype)
        all_y = all_gather_with_grad(y, group)
        if iid is None:
            labels = torch.arange(n, device=x.device) + n * rank
            return impl(x, all_y, scale, bias, labels, False)
        all_tid = _all_ids(tid, group)
        all_c = None if c is None else _all_ids(c, group)
        return _siglip_block(impl, x, all_y, scale, bias, True, (iid, all_tid, r, all_c))
    _, impl = resolve("siglip", backend, x.device, n * m, x.dtype)  # float64 keeps a float64 path
    return _SigLipBlocks.apply(x, y, scale, bias, iid, tid, r, c, impl, _plan(dist_impl, world), group)


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
