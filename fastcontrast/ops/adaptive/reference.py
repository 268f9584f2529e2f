"""Per-sample temperature, schedules and max-margin losses (SPEC §3, MM-TS)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cosine_schedule(step, total_steps, v_min, v_max):
    """τ(t) = v_min + ½(v_max − v_min)(1 + cos(2π t / T)): starts at v_max, dips to v_min at T/2, back at T.

    Works for temperatures and margins alike; ``step`` may be a number or a tensor.
    """
    if isinstance(step, torch.Tensor):
        return v_min + 0.5 * (v_max - v_min) * (1 + torch.cos(2 * math.pi * step / total_steps))
    return v_min + 0.5 * (v_max - v_min) * (1 + math.cos(2 * math.pi * step / total_steps))


def local_density_reference(features: torch.Tensor, k: int) -> torch.Tensor:
    """Mean cosine similarity of each sample to its k nearest neighbours in the batch (self excluded). (N,)."""
    f = F.normalize(features.to(torch.float64 if features.dtype == torch.float64 else torch.float32), dim=-1)
    sim = f @ f.T
    sim.fill_diagonal_(float("-inf"))
    return sim.topk(k, dim=1).values.mean(dim=1)


def density_to_temperature(density: torch.Tensor, tau: float, tau_min: float, tau_max: float) -> torch.Tensor:
    """Monotone map of density into [τ_min, τ_max] around τ: τ at the batch-mean density (choice).

    z = standardised density; τ_i = τ + (τ_max − τ)·tanh(z) for z ≥ 0, τ + (τ − τ_min)·tanh(z) for z < 0,
    so denser samples (z > 0) get higher temperatures and the batch's typical sample keeps the schedule's τ.
    """
    z = (density - density.mean()) / (density.std(unbiased=False) + 1e-6) if density.numel() > 1 else density * 0
    t = torch.tanh(z)
    return torch.where(t >= 0, tau + (tau_max - tau) * t, tau + (tau - tau_min) * t)


def density_temperature_reference(features, k, tau, tau_min, tau_max):
    """Per-sample temperature from local density; a statistic, so no gradient flows (choice, SPEC §3)."""
    with torch.no_grad():
        return density_to_temperature(local_density_reference(features, k), tau, tau_min, tau_max).to(features.dtype)


def adaptive_temperature_clip_loss_reference(x, y, tau_image, tau_text, labels=None, logit_bias=None, normalize=False):
    """Row i of image→text uses ⟨x_i,y_j⟩/τ_i; column j of text→image uses ⟨x_i,y_j⟩/τ'_j."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, y = x.to(acc), y.to(acc)
    if normalize:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    s = x @ y.T
    n = x.shape[0]
    if labels is None:
        labels = torch.arange(n, device=x.device)
    rows = torch.arange(n, device=x.device)
    l_row = s / tau_image.to(acc)[:, None]
    l_col = s / tau_text.to(acc)[None, :]
    if logit_bias is not None:
        l_row, l_col = l_row + logit_bias, l_col + logit_bias
    i2t = F.cross_entropy(l_row, labels)
    t2i = (torch.logsumexp(l_col, dim=0)[labels] - l_col[rows, labels]).mean()
    return (i2t + t2i) / 2


def max_margin_loss_reference(x, y, margin, labels=None, hardest: bool = False, normalize: bool = True):
    """Bidirectional hinge: Σ_{j∉pos} [m − S_{i,p(i)} + S_ij]_+ + Σ_{i'∉pos} [m − S_{i,p(i)} + S_{i',p(i)}]_+.

    Averaged over positive pairs (choice); ``hardest`` keeps only the largest violation per direction (VSE++).
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, y = x.to(acc), y.to(acc)
    if normalize:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    s = x @ y.T
    n, m_cols = s.shape
    if labels is None:
        labels = torch.arange(n, device=x.device)
    rows = torch.arange(n, device=x.device)
    pos = s[rows, labels]  # (N,)
    is_pos = torch.zeros(n, m_cols, dtype=torch.bool, device=s.device).scatter_(1, labels[:, None], True)  # E_ij
    # image→text: row i against every non-positive column
    cost_row = (margin - pos[:, None] + s).clamp(min=0).masked_fill(is_pos, 0)
    # text→image: column p(i) against every row that is not a positive of that column
    col_s = s[:, labels].T  # (N pairs, N rows): S_{i', p(i)}
    col_is_pos = is_pos[:, labels].T
    cost_col = (margin - pos[:, None] + col_s).clamp(min=0).masked_fill(col_is_pos, 0)
    if hardest:
        return (cost_row.max(dim=1).values + cost_col.max(dim=1).values).mean()
    return (cost_row.sum(dim=1) + cost_col.sum(dim=1)).mean()
