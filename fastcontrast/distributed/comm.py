"""Communication helpers shared by every distributed mode: ranks, the host-side agreement checks, the
differentiable all-gather (and its adjoint), and point-to-point transfers posted without waiting.

Every distributed loss checks on every call, over a gloo side group of the same ranks, that all ranks hold the
same local sizes and made the same call (:func:`check_ranks_agree`): uneven batches raise the same ValueError on
every rank instead of leaving some waiting, and no GPU stream is synced for it.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.distributed as dist
from torch import Tensor


def world_of(group) -> Tuple[int, int]:
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
    _, world = world_of(group)
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
    check_ranks_agree(n_local if isinstance(n_local, (tuple, list)) else [n_local], (), group, sizes_label="")


class AllGather(torch.autograd.Function):
    """(world·N, ...) = the ranks' tensors stacked along dim 0; backward sums the ranks' gradients of this rank's
    slice (a reduce-scatter), the semantics of ``torch.distributed.nn.all_gather``, on public c10d calls only
    (that module is deprecated and warns on every call)."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        rank, world = world_of(group)
        ctx.group, ctx.rank, ctx.world = group, rank, world
        t = t.contiguous()
        out = t.new_empty((world * t.shape[0],) + tuple(t.shape[1:]))
        dist.all_gather(list(out.chunk(world)), t, group=group)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        # through a Function of its own, so that a gradient of this gradient (create_graph=True) is exact too
        return ReduceScatter.apply(g, ctx.group), None


class ReduceScatter(torch.autograd.Function):
    """(N, ...) = this rank's slice of the ranks' (world·N, ...) tensors summed: the adjoint of :class:`AllGather`
    (and its backward an all-gather), so double backward through a gather is exact."""

    @staticmethod
    def forward(ctx, g: Tensor, group) -> Tensor:
        rank, world = world_of(group)
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
        return AllGather.apply(h, ctx.group), None


# the distributed modes whose backward is autograd's own (gathers with exact adjoints): double backward works there
GATHER_ALTERNATIVE = "ClipLoss(mode='gather') / SigLipLoss(dist_impl='gather') with backend='reference'"


def all_gather_with_grad(t: Tensor, group=None) -> Tensor:
    """Every rank's ``t`` concatenated along dim 0, differentiable (gradients are summed over ranks)."""
    return AllGather.apply(t, group)


def check_ranks_agree(sizes, flags, group, options: str = "image_ids/text_ids given, weighting, dist_impl",
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


def all_ids(ids: Tensor, group) -> Tensor:
    """Every rank's ``ids`` concatenated (no gradient)."""
    _, world = world_of(group)
    out = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(out, ids.contiguous(), group=group)
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------------- P2P
_COMM_STREAMS = {}


def _comm_stream(device: torch.device):
    """The side stream this device's ring transfers are issued on (NCCL only; one per device, made once)."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    s = _COMM_STREAMS.get(key)
    if s is None:
        s = _COMM_STREAMS[key] = torch.cuda.Stream(device=torch.device("cuda", key))
    return s


class Pending:
    """Transfers in flight; :meth:`wait` makes their results safe to read on the current stream."""

    def __init__(self, reqs, stream=None):
        self.reqs, self.stream = reqs, stream

    def wait(self) -> None:
        for r in self.reqs:
            r.wait()
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
        self.reqs = []


def post(ops, group, device: torch.device) -> Pending:
    """Start point-to-point transfers without waiting: ``ops`` = [(send?, tensor, peer (rank in group), tag)].

    One ``batch_isend_irecv`` (a single NCCL group call). Every rank posts the same sequence, so sends and
    receives between two ranks pair up in order (gloo also matches the tags). On NCCL they are issued from a side
    stream that first waits for the tensors to be written, so the block compute that follows on the current stream
    runs beside them; the received tensors are read only after :meth:`Pending.wait`."""
    if not ops:
        return Pending([])
    p2p = [dist.P2POp(dist.isend if send else dist.irecv, t, global_rank(group, peer), group=group, tag=tag)
           for send, t, peer, tag in ops]
    return launch(lambda: dist.batch_isend_irecv(p2p), [t for _, t, _, _ in ops], group, device)


def global_rank(group, r: int) -> int:
    return r if group is None else dist.get_global_rank(group, r)


def launch(issue, tensors: List[Tensor], group, device: torch.device) -> Pending:
    """``issue()`` (returning its async works), on the side stream on NCCL, so the caller's compute overlaps it."""
    if device.type == "cuda" and dist.get_backend(group) == "nccl":
        stream = _comm_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))  # what is sent has been written
        with torch.cuda.stream(stream):
            reqs = issue()
        for t in tensors:  # the caching allocator must not hand these out while the side stream uses them
            t.record_stream(stream)
        return Pending(list(reqs), stream)
    return Pending(list(issue()))


def shift_ops(send: List[Tensor], recv: List[Tensor], to: int, frm: int, tag: int):
    return [(True, t, to, tag + i) for i, t in enumerate(send)] + [(False, t, frm, tag + i) for i, t in enumerate(recv)]


def empties(parts: List[Tensor]) -> List[Tensor]:
    return [torch.empty_like(t) for t in parts]


def bcast(parts: List[Tensor], src: int, group, device) -> Pending:
    return launch(lambda: [dist.broadcast(t, global_rank(group, src), group=group, async_op=True) for t in parts],
                  parts, group, device)


def reduce_to(t: Tensor, dst: int, group, device) -> Pending:
    return launch(lambda: [dist.reduce(t, global_rank(group, dst), group=group, async_op=True)], [t], group,
                  device)
