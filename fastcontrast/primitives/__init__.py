"""Shared primitives: the kernels and their autograd, named by what they compute, used by the loss modules
(``fastcontrast.losses``) and the distributed modes. Nothing here imports the public API, the dispatcher's
registrations or the distributed layer: the kernel each call runs is decided by ``fastcontrast.dispatch`` and
passed in.

* ``lse_pair``: the pairwise log-sum-exp over rows and columns of S = x̂ŷᵀ with its slab backward (every
  InfoNCE-family loss); ``soft_ce``: the soft-target cross-entropy against codes (CPU); ``weighted_keys``: the
  teacher-softmax-weighted keys (distillation);
* ``softplus_sweep``: Σ_ij softplus(s·S_ij + b) (SigLIP); ``hinge_sweep``: the max-margin hinges;
* ``sinkhorn``: Sinkhorn–Knopp in potentials; ``groups``: per-group sums by id (multiple positives);
* ``tiles`` (normalisation, the slab driver, the row-block iterator), ``triton_tiles`` (shared Triton helpers),
  ``configs`` (the launch table), ``fused_op`` (one declaration per custom op), ``triton_support``.
"""
