"""Sweep tile shapes of the fused InfoNCE kernels on a GPU; prints median ms per config for fwd and bwd.

    python benchmarks/tune_infonce.py [--n 16384] [--d 768] [--dtype bfloat16]

FLOPs executed: forward 2 × 2NMd (row and column passes); backward 3 × 2NMd (S recomputed once in the G-tile
kernel, then the dX̂ = GŶ and dŶ = GᵀX̂ GEMMs).
"""
import argparse
import itertools

import torch

from fastcontrast.bench import median_ms
from fastcontrast.primitives import configs as _configs
from fastcontrast.primitives import lse_pair as fn


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--dtype", default="bfloat16")
    a = p.parse_args()
    dev = torch.device("cuda")
    dt = getattr(torch, a.dtype)
    n, d = a.n, a.d
    x = torch.nn.functional.normalize(torch.randn(n, d, device=dev), dim=1).to(dt)
    y = torch.nn.functional.normalize(torch.randn(n, d, device=dev), dim=1).to(dt)
    s = torch.full((n,), 14.3, device=dev)
    b = torch.zeros((), device=dev)
    g = torch.full((n,), 1.0 / n, device=dev)
    unit = 2 * n * n * d
    print("| kernel | BM | BN | BK | BDO | warps | stages | ms | TFLOP/s (executed) |")
    print("|---|---|---|---|---|---|---|---|---|")
    lse = fn._triton_fwd(x, y, s, s, b, False, 1)
    fwd_cfgs = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st)
                for bm, bn, bk, w, st in itertools.product((64, 128), (64, 128), (64,), (4, 8), (3, 4))]
    for c in fwd_cfgs:
        _configs.OVERRIDE["_lse_fwd_kernel"] = c
        try:
            ms = median_ms(lambda: fn._triton_fwd(x, y, s, s, b, False, 1), dev, warmup=2, reps=5)
            print(f"| fwd | {c['BLOCK_M']} | {c['BLOCK_N']} | {c['BLOCK_K']} | - | {c['num_warps']} | "
                  f"{c['num_stages']} | {ms:.3f} | {unit / ms / 1e9:.0f} |", flush=True)
        except Exception as e:  # noqa: BLE001 - out of shared memory etc.
            print(f"| fwd | {c} | failed: {type(e).__name__} |", flush=True)
    bwd_cfgs = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, num_warps=w, num_stages=st)
                for bm, bn, w, st in itertools.product((64, 128), (64, 128), (4, 8), (3, 4))]
    for c in bwd_cfgs:
        _configs.OVERRIDE["_grad_tile_kernel"] = c
        try:
            ms = median_ms(lambda: fn.lse_backward_slabs(g, g, x, y, s, s, b, *lse, False, 1, use_triton=True),
                           dev, warmup=2, reps=5)
            print(f"| bwd (G tiles + 2 GEMMs) | {c['BLOCK_M']} | {c['BLOCK_N']} | {c['BLOCK_K']} | - | "
                  f"{c['num_warps']} | {c['num_stages']} | {ms:.3f} | {3 * unit / ms / 1e9:.0f} |", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"| bwd | {c} | failed: {type(e).__name__} |", flush=True)
    _configs.OVERRIDE.clear()


if __name__ == "__main__":
    main()
