"""Dataset-wide cluster sizes for MM-TS, computed once before training.

MM-TS shifts each sample's temperature by the size of its cluster over the *whole dataset*: the text annotations
are embedded and clustered with K-means before training (or annotated classes are used, as the authors do for
EPIC-KITCHENS-100 noun classes), and sample i's cluster size c_i enters sh(c_i) (:func:`fastcontrast.mmts_temperature`).

    index = kmeans(text_embeddings, n_clusters=300)        # or: from_labels(class_ids)
    index.save("clusters.pt")                               # beside the dataset index
    ...
    index = ClusterIndex.load("clusters.pt")
    sizes = index.sizes_of(batch_indices)                   # (B,) c_i of the samples in a batch
    tau = fc.mmts_temperature(sizes, step, total_steps, index.c_min, index.c_max)

:func:`kmeans` is Lloyd's algorithm in torch, on the CPU or a GPU, streaming the embeddings in batches: memory is
O(batch·K + K·D) beyond the embeddings themselves, so millions of rows fit.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
from torch import Tensor

from . import _validation as V


@dataclasses.dataclass
class ClusterIndex:
    """ids (N,): each dataset sample's cluster; sizes (K,): how many samples each cluster holds."""

    ids: Tensor
    sizes: Tensor

    def __post_init__(self):
        if self.ids.dim() != 1 or self.ids.is_floating_point():
            raise ValueError(f"ids must be an integer tensor of shape (N,), got {self.ids.dtype} {tuple(self.ids.shape)}")
        if self.sizes.dim() != 1 or self.sizes.is_floating_point():
            raise ValueError(f"sizes must be an integer tensor of shape (K,), got {tuple(self.sizes.shape)}")
        self.ids, self.sizes = self.ids.long(), self.sizes.long()

    @property
    def c_min(self) -> int:
        """The smallest non-empty cluster (the official code's min over its count table)."""
        return int(self.sizes[self.sizes > 0].min())

    @property
    def c_max(self) -> int:
        return int(self.sizes.max())

    def sizes_of(self, indices: Union[Tensor, slice, None] = None) -> Tensor:
        """c_i, the cluster size of dataset samples ``indices`` (all when None): (B,) int64."""
        ids = self.ids if indices is None else self.ids[indices]
        return self.sizes[ids]

    def save(self, path: str) -> None:
        torch.save({"ids": self.ids.cpu(), "sizes": self.sizes.cpu(), "format": "fastcontrast.ClusterIndex/1"},
                   path)

    @classmethod
    def load(cls, path: str) -> "ClusterIndex":
        d = torch.load(path, map_location="cpu", weights_only=True)
        if d.get("format") != "fastcontrast.ClusterIndex/1":
            raise ValueError(f"path: {path!r} is not a file written by ClusterIndex.save")
        return cls(d["ids"], d["sizes"])


def from_labels(labels: Tensor) -> ClusterIndex:
    """Annotated classes as clusters (e.g. noun classes): labels (N,) non-negative integers."""
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dim() != 1 or labels.numel() == 0:
        raise TypeError("labels must be a non-empty integer tensor of shape (N,)")
    labels = labels.long()
    if int(labels.min()) < 0:
        raise ValueError("labels must be >= 0 (class ids)")
    return ClusterIndex(labels, torch.bincount(labels))


def _sq_dists(x: Tensor, c: Tensor, c_sq: Tensor) -> Tensor:
    return (x * x).sum(1, keepdim=True) - 2 * x @ c.T + c_sq[None, :]


def _assign(data: Tensor, centroids: Tensor, batch_size: int, device, sums: Optional[Tensor] = None,
            counts: Optional[Tensor] = None) -> Tensor:
    """Nearest centroid of every row, batch by batch; accumulates per-cluster sums and counts when given."""
    c_sq = (centroids * centroids).sum(1)
    ids = torch.empty(data.shape[0], dtype=torch.long)
    for i0 in range(0, data.shape[0], batch_size):
        x = data[i0:i0 + batch_size].to(device=device, dtype=centroids.dtype)
        a = _sq_dists(x, centroids, c_sq).argmin(1)
        ids[i0:i0 + batch_size] = a.cpu()
        if sums is not None:
            sums.index_add_(0, a, x)
            counts.index_add_(0, a, torch.ones_like(a, dtype=counts.dtype))
    return ids


def kmeans(embeddings: Tensor, n_clusters: int, n_iters: int = 25, batch_size: int = 65536, seed: int = 0,
           device: Union[str, torch.device, None] = None, normalize: bool = False, tol: float = 1e-4) -> ClusterIndex:
    """K-means (Lloyd, k-means++ seeding on a sample) of ``embeddings`` (N, D), streamed in ``batch_size`` rows.

    ``embeddings`` may stay on the CPU (even memory-mapped) while ``device`` does the arithmetic in float32.
    ``normalize=True`` clusters the L2-normalised rows (cosine geometry, common for text embeddings).
    Stops after ``n_iters`` passes or when no centroid moves by more than ``tol`` (relative). Deterministic for
    a given ``seed``. Empty clusters are re-seeded with random rows.
    """
    V.check_features("embeddings", embeddings, 2)
    n = embeddings.shape[0]
    k = V.check_positive_int("n_clusters", n_clusters)
    if k > n:
        raise ValueError(f"n_clusters ({k}) must not exceed the number of embeddings ({n})")
    n_iters = V.check_positive_int("n_iters", n_iters)
    batch_size = V.check_positive_int("batch_size", batch_size)
    device = torch.device(device) if device is not None else embeddings.device
    data = torch.nn.functional.normalize(embeddings.float(), dim=1) if normalize else embeddings
    g = torch.Generator().manual_seed(seed)

    # k-means++ on a sample of at most max(50 K, 10 000) rows
    sample = data[torch.randperm(n, generator=g)[: min(n, max(50 * k, 10_000))]].to(device, torch.float32)
    cents = [sample[int(torch.randint(sample.shape[0], (1,), generator=g))]]
    d2 = ((sample - cents[0]) ** 2).sum(1)
    for _ in range(1, k):
        w = d2.clamp_min(0).cpu().double()
        j = int(torch.multinomial(w / w.sum(), 1, generator=g)) if float(w.sum()) > 0 else \
            int(torch.randint(sample.shape[0], (1,), generator=g))
        cents.append(sample[j])
        d2 = torch.minimum(d2, ((sample - sample[j]) ** 2).sum(1))
    centroids = torch.stack(cents)

    for _ in range(n_iters):
        sums = torch.zeros_like(centroids)
        counts = torch.zeros(k, device=device, dtype=torch.float32)
        _assign(data, centroids, batch_size, device, sums, counts)
        new = sums / counts.clamp_min(1)[:, None]
        empty = (counts == 0).nonzero().flatten().cpu()
        if len(empty):  # re-seed from random rows
            rows = torch.randint(n, (len(empty),), generator=g)
            new[empty.to(device)] = data[rows].to(device, torch.float32)
        shift = float((new - centroids).norm() / centroids.norm().clamp_min(1e-12))
        centroids = new
        if shift <= tol and not len(empty):
            break
    ids = _assign(data, centroids, batch_size, device)
    return ClusterIndex(ids, torch.bincount(ids, minlength=k))
