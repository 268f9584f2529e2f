"""Per-sample temperatures and schedules (MM-TS): ``mmts_temperature``, ``cosine_schedule``,
``density_temperature``; readable ground truth, also what runs (they are O(N) or a k-NN of the batch).

MM-TS, as its authors' code computes it (SergShel/MM-TS @0010879):
  τ_base(t) = (α/2)·cos(2πt/P), P = total_steps / num_oscillations      (avion/mmts_utils/temperature.py)
  sh(c_i)   = (c_i − c_min)/(c_max − c_min)·(s_max − s_min) + s_min       (avion/mmts_utils/shift.py)
  τ_i(t)    = τ_base(t) + sh(c_i), c_i the dataset-wide size of sample i's cluster
  loss      = ½[CE(X Yᵀ/τ_i) + CE(Y Xᵀ/τ_i)], one τ_i for image row i and text row i;
  max-margin: relu(τ_i − (S_ii − S_ij)) and relu(τ_i − (S_ii − S_ji)), j ≠ i, mean over all 2n(n−1) terms
                                                                          (avion/avion/losses/losses.py)
This package's extensions, not MM-TS: the in-batch k-NN density temperature (``local_density_reference``,
``density_to_temperature``), the hardest-negative (VSE++) hinge and the "sum" reduction of the hinge.
"""
from __future__ import annotations

import math

import torch

from ..dispatch import register
from ..primitives.tiles import l2_normalize

# MM-TS defaults (main_lavila_finetune_mir.py: --mmts-alpha, --mmts-num-oscillations, --mmts-shift-min/max)
MMTS_ALPHA, MMTS_NUM_OSCILLATIONS, MMTS_SHIFT_MIN, MMTS_SHIFT_MAX = 0.08, 5, 0.05, 0.20


def mmts_base_temperature(step, total_steps: int, alpha: float = MMTS_ALPHA,
                          num_oscillations: int = MMTS_NUM_OSCILLATIONS):
    """τ_base(t) = (α/2)·cos(2πt/P), P = int(total_steps / num_oscillations) (the official
    ``number_steps_per_period``): a zero-mean oscillation, ``num_oscillations`` periods over the run."""
    period = int(total_steps / num_oscillations)
    if isinstance(step, torch.Tensor):
        return 0.5 * alpha * torch.cos(2 * math.pi * step / period)
    return 0.5 * alpha * math.cos(2 * math.pi * step / period)


def cluster_shift(cluster_sizes: torch.Tensor, c_min: float, c_max: float, s_min: float = MMTS_SHIFT_MIN,
                  s_max: float = MMTS_SHIFT_MAX) -> torch.Tensor:
    """sh(c) = (c − c_min)/(c_max − c_min)·(s_max − s_min) + s_min: larger (denser) clusters, larger shift.
    c_min, c_max: the smallest and largest cluster size over the whole dataset (not the batch)."""
    acc = torch.float64 if cluster_sizes.dtype == torch.float64 else torch.float32
    return (cluster_sizes.to(acc) - c_min) / (c_max - c_min) * (s_max - s_min) + s_min


def mmts_temperature(cluster_sizes, step, total_steps, c_min, c_max, alpha=MMTS_ALPHA,
                     num_oscillations=MMTS_NUM_OSCILLATIONS, s_min=MMTS_SHIFT_MIN, s_max=MMTS_SHIFT_MAX):
    """τ_i(t) = τ_base(t) + sh(c_i): (N,) from each sample's dataset-wide cluster size (N,)."""
    return mmts_base_temperature(step, total_steps, alpha, num_oscillations) + cluster_shift(
        cluster_sizes, c_min, c_max, s_min, s_max)


def cosine_schedule(step, total_steps, v_min, v_max):
    """τ(t) = v_min + ½(v_max − v_min)(1 + cos(2π t / T)): starts at v_max, dips to v_min at T/2, back at T.

    Works for temperatures and margins alike; ``step`` may be a number or a tensor.
    """
    if isinstance(step, torch.Tensor):
        return v_min + 0.5 * (v_max - v_min) * (1 + torch.cos(2 * math.pi * step / total_steps))
    return v_min + 0.5 * (v_max - v_min) * (1 + math.cos(2 * math.pi * step / total_steps))


def local_density_reference(features: torch.Tensor, k: int) -> torch.Tensor:
    """Mean cosine similarity of each sample to its k nearest neighbours in the batch (self excluded). (N,)."""
    f = l2_normalize(features.to(torch.float64 if features.dtype == torch.float64 else torch.float32), dim=-1)
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


register("density", "reference")(local_density_reference)
