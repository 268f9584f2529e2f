"""SwAV's ``distributed_sinkhorn``: one balanced assignment of every rank's rows together."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..primitives import tiles as T
from .comm import world_of


@torch.no_grad()
def distributed_sinkhorn(scores: Tensor, epsilon: float = 0.05, n_iters: int = 3, group=None) -> Tensor:
    """SwAV's ``distributed_sinkhorn`` in log space: one balanced assignment of every rank's rows together.

    scores (n_local, K) on each rank -> Q (n_local, K): rows sum to 1, and each code's column sum over *all*
    ranks' rows is N_global/K. The only communication is, per iteration, an all-reduce (max, then sum) of the
    K column statistics; rows stay local. Equal to :func:`fastcontrast.sinkhorn` on the concatenated rows.
    """
    world_of(group)
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
