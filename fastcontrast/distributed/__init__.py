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
from .clip_ring import ring_clip_loss
from .comm import all_gather_with_grad, check_equal_local_batches
from .gather import gather_features
from .siglip import SIGLIP_DIST_IMPLS, siglip_distributed_loss
from .sinkhorn import distributed_sinkhorn

__all__ = ["all_gather_with_grad", "check_equal_local_batches", "distributed_sinkhorn", "gather_features",
           "ring_clip_loss", "siglip_distributed_loss", "SIGLIP_DIST_IMPLS"]
