"""Launch configurations of every Triton kernel: one table, per GPU architecture and dtype class.

The launchers ask :func:`config` (kernel name, device, dtype); ``python -m fastcontrast aot`` compiles every entry
of the table for its architecture without a GPU and reports registers, spills and shared memory
(benchmarks/results/triton_aot.md), so each entry is checked to fit its arch: shared memory per block at most
166,912 B on sm_80 (A100) and 232,448 B on sm_90 (H100), and at most 512 B of stack.

Architectures: "sm80" (Ampere: A100, also the fallback for anything older), "sm90" (Hopper) and "sm100"
(Blackwell: the Hopper tiles until a Blackwell GPU has tuned its own; compiled and checked like the others). Dtype classes: "16" (fp16/bf16: tensor cores, 2-byte tiles) and "32"
(fp32/tf32: 4-byte tiles, so half the K-depth per stage to keep the same pipeline within shared memory).
Under the Triton interpreter (tests on the CPU) every kernel gets small tiles, so the tests cover ragged tails
and several K-chunks.
"""
from __future__ import annotations

from typing import Dict, Iterator, Tuple

import torch

ARCHS = ("sm80", "sm90", "sm100")
CC = {"sm80": 80, "sm90": 90, "sm100": 100}
SMEM_LIMIT = {"sm80": 166_912, "sm90": 232_448, "sm100": 232_448}
DTYPE_CLASSES = ("16", "32")

INTERPRETER = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
INTERPRETER_RC = dict(BLOCK_R=32, BLOCK_C=32, num_warps=4, num_stages=1)

# 16-bit: the H100 tile sweep (RESULTS.md, benchmarks/tune_infonce.py): 128×64×64, 8 warps, 4 stages for the InfoNCE
# kernels, 128×128×64 for the rest; 3-4 K-chunks stay in shared memory on both archs (triton_aot.md).
# 32-bit: BLOCK_K = 32 and 3 stages: the 16-bit tiles in fp32 asked for 196,608 B (over an A100's 166,912) and
# spilled 1-6 KB at 255 registers; 128×64×32 spills at most 16 B on either arch, as ieee or tf32 dots.
_PAIR16 = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=4)
_WIDE16 = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4)
_PAIR32 = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3)


def _pairwise(c16: dict) -> Dict[Tuple[str, str], dict]:  # one config per dtype class, on every arch
    return {**{(a, "16"): c16 for a in ARCHS}, **{(a, "32"): _PAIR32 for a in ARCHS}}


# kernel -> {(arch, dtype class): launch config}
TABLE: Dict[str, Dict[Tuple[str, str], dict]] = {
    "_lse_fwd_kernel": _pairwise(_PAIR16),
    "_grad_tile_kernel": _pairwise(_PAIR16),
    "_hinge_fwd_kernel": _pairwise(_WIDE16),
    "_hinge_grad_tile_kernel": _pairwise(_WIDE16),
    "_hinge_pair_fwd_kernel": _pairwise(_PAIR16),
    "_hinge_pair_grad_tile_kernel": _pairwise(_PAIR16),
    "_softplus_rows_kernel": _pairwise(_WIDE16),
    "_sigmoid_grad_tile_kernel": _pairwise(_WIDE16),
    "_lse_axis_kernel": {(a, c): dict(BLOCK_R=64, BLOCK_C=128, num_warps=4, num_stages=3)
                         for a in ARCHS for c in DTYPE_CLASSES},
    "_sinkhorn_out_kernel": {(a, c): dict(BLOCK_R=64, BLOCK_C=128, num_warps=4, num_stages=3)
                             for a in ARCHS for c in DTYPE_CLASSES},
}

OVERRIDE: Dict[str, dict] = {}  # kernel -> config: benchmarks/tune_infonce.py sweeps through this


def arch_of(device: torch.device) -> str:
    major, _ = torch.cuda.get_device_capability(device)
    return "sm100" if major >= 10 else "sm90" if major >= 9 else "sm80"


def dtype_class(dtype: torch.dtype) -> str:
    return "16" if dtype in (torch.float16, torch.bfloat16) else "32"


def config(kernel: str, device: torch.device, dtype: torch.dtype) -> dict:
    """The launch configuration (tile constexprs plus num_warps/num_stages) of ``kernel`` on ``device``."""
    if kernel in OVERRIDE:
        return dict(OVERRIDE[kernel])
    if device.type != "cuda":
        return dict(INTERPRETER_RC if "BLOCK_R" in next(iter(TABLE[kernel].values())) else INTERPRETER)
    return dict(TABLE[kernel][(arch_of(device), dtype_class(dtype))])


def launch(kernel: str, device: torch.device, dtype: torch.dtype) -> Tuple[dict, int, int]:
    """(tile constexprs, num_warps, num_stages)."""
    cfg = config(kernel, device, dtype)
    return cfg, cfg.pop("num_warps"), cfg.pop("num_stages")


def entries() -> Iterator[Tuple[str, str, str, dict]]:
    """Every (kernel, arch, dtype class, config) the CUDA dispatch can choose."""
    for kernel, by in TABLE.items():
        for (arch, dclass), cfg in by.items():
            yield kernel, arch, dclass, dict(cfg)
