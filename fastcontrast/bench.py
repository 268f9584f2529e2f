"""Speed and memory of the InfoNCE family against its baselines, measured in one run.

``python -m fastcontrast bench [--sizes 1024,4096] [--dim 512] [--dtype bf16] [--out DIR]`` prints a markdown
table (median forward and forward+backward time, peak extra memory, ratio to each baseline, achieved TFLOP/s and
the FLOP floor) and writes ``bench.csv`` and ``bench.md`` (and ``bench.png`` when matplotlib is installed).

Baselines, each measured in the same run on the same inputs: the eager reference (materialises N×M), the
``torch.compile``d reference, open_clip's ``ClipLoss`` when importable, Inf-CL's single-GPU ``cal_flash_loss`` (both directions) when installed.
"""
from __future__ import annotations

import csv
import importlib.util
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from . import functional as Fn
from .dispatch import resolve


# ------------------------------------------------------------------------------------------------ measuring
def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], dev: torch.device, warmup: int = 2, reps: int = 7,
              budget_s: float = 20.0) -> float:
    """Median wall time of ``fn`` in ms: CUDA events on GPU, perf_counter on CPU; warm-up excluded."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    times: List[float] = []
    t_start = time.perf_counter()
    for _ in range(reps):
        if dev.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - t_start > budget_s and len(times) >= 3:
            break
    return statistics.median(times)


def peak_extra_bytes(fn: Callable[[], object], dev: torch.device) -> int:
    """Peak memory allocated by ``fn`` beyond what was live before it (CUDA allocator / ATen-level on CPU)."""
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from ._memtrack import PeakMemory

    with PeakMemory() as pm:
        fn()
    return pm.peak


def matmul_tflops(dev: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul rate on this device (the compute ceiling used for '% of peak')."""
    n = 8192 if dev.type == "cuda" else 1024
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    ms = median_ms(lambda: a @ b, dev, warmup=3, reps=10)
    return 2 * n**3 / (ms * 1e-3) / 1e12


# ------------------------------------------------------------------------------------------------ candidates
def _open_clip_loss():
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    s = importlib.util.spec_from_file_location("_open_clip_loss", path)
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return mod.ClipLoss()


def _inf_cl():
    """Inf-CL's single-GPU Triton loss; it is one-directional (rows → columns), so CLIP's loss is two calls."""
    try:
        from inf_cl import cal_flash_loss  # type: ignore  (cal_inf_loss needs a process group)
    except Exception:  # noqa: BLE001
        return None
    return lambda x, y, s: 0.5 * (cal_flash_loss(x, y, scale=s).mean() + cal_flash_loss(y, x, scale=s).mean())


def candidates(dev: torch.device, with_compile: bool = True) -> Dict[str, Callable]:
    """name -> loss(x, y, scale) for every implementation available on ``dev``."""
    out: Dict[str, Callable] = {}
    fused, _ = resolve("infonce", "auto", dev)
    if fused != "reference":
        out[f"fastcontrast[{fused}]"] = lambda x, y, s, b=fused: Fn.clip_loss(x, y, s, backend=b)
    if dev.type == "cpu" and "TRITON_INTERPRET" not in os.environ:
        # the blockwise PyTorch tiles behind the custom op: what runs on CPU without the C++ extension
        from .ops.infonce.function import infonce_fused

        def tiles(x, y, s):
            n = x.shape[0]
            return infonce_fused(x, y, s.expand(n), s.expand(n), None, torch.arange(n, device=x.device), False, 1)

        out["fastcontrast[torch-tiles]"] = tiles
    out["reference (eager)"] = lambda x, y, s: Fn.clip_loss(x, y, s, backend="reference")
    if with_compile:
        from .ops.infonce.reference import clip_loss_reference

        out["reference (compiled)"] = torch.compile(lambda x, y, s: clip_loss_reference(x, y, s), dynamic=False)
    oc = _open_clip_loss()
    if oc is not None:
        out["open_clip ClipLoss"] = lambda x, y, s: oc(x, y, s)
    inf = _inf_cl()
    if inf is not None and dev.type == "cuda":
        out["Inf-CL (flash, 2 calls)"] = inf
    return out


# ------------------------------------------------------------------------------------------------ the sweep
def run(sizes: List[int], dim: int, dtype: torch.dtype, dev: torch.device, out_dir: Optional[str] = None,
        with_compile: bool = True, reps: int = 7, log=print):
    peak = matmul_tflops(dev, dtype)
    log(f"# device: {_device_name(dev)}; dtype {str(dtype).replace('torch.', '')}; d = {dim}; "
        f"measured matmul peak {peak:.1f} TFLOP/s")
    rows = []
    cands = candidates(dev, with_compile)
    try:
        from tqdm import tqdm  # progress bar when available
        it = tqdm([(n, k) for n in sizes for k in cands], file=sys.stderr, leave=False)
    except Exception:  # noqa: BLE001
        it = [(n, k) for n in sizes for k in cands]
    inputs = {}
    for n, name in it:
        if n not in inputs:
            g = torch.Generator(device="cpu").manual_seed(n)
            x = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1).to(dev, dtype)
            y = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1).to(dev, dtype)
            inputs = {n: (x.requires_grad_(), y.requires_grad_(), torch.tensor(14.3, device=dev, requires_grad=True))}
        x, y, s = inputs[n]
        fn = cands[name]

        def fwd():
            with torch.no_grad():
                return fn(x, y, s)

        def fwd_bwd():
            x.grad = y.grad = s.grad = None
            fn(x, y, s).backward()

        row = {"n": n, "d": dim, "impl": name}
        try:
            row["fwd_ms"] = median_ms(fwd, dev, reps=reps)
            row["fwd_bwd_ms"] = median_ms(fwd_bwd, dev, reps=reps)
            row["peak_mib"] = peak_extra_bytes(fwd_bwd, dev) / 2**20
        except torch.cuda.OutOfMemoryError:
            row.update(fwd_ms=float("nan"), fwd_bwd_ms=float("nan"), peak_mib=float("nan"), note="OOM")
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            row.update(fwd_ms=float("nan"), fwd_bwd_ms=float("nan"), peak_mib=float("nan"),
                       note=f"{type(e).__name__}: {str(e)[:60]}")
        # FLOP floor of forward+backward: S once, then dX and dY (3 × 2NMd); the fused path recomputes S
        row["floor_ms"] = 6 * n * n * dim / (peak * 1e12) * 1e3
        rows.append(row)
    _ratios(rows)
    table = to_markdown(rows)
    log(table)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "bench.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
            w.writeheader()
            w.writerows(rows)
        with open(os.path.join(out_dir, "bench.md"), "w") as f:
            f.write(table + "\n")
        plot(rows, os.path.join(out_dir, "bench.png"))
    return rows


def _ratios(rows):
    by_n: Dict[int, Dict[str, dict]] = {}
    for r in rows:
        by_n.setdefault(r["n"], {})[r["impl"]] = r
    for n, impls in by_n.items():
        base = impls.get("reference (eager)")
        for r in impls.values():
            if base and base.get("fwd_bwd_ms") == base.get("fwd_bwd_ms") and r["fwd_bwd_ms"] == r["fwd_bwd_ms"]:
                r["speedup_vs_eager"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
                r["mem_vs_eager"] = r["peak_mib"] / base["peak_mib"] if base["peak_mib"] else float("nan")


def to_markdown(rows) -> str:
    hdr = "| N | impl | fwd ms | fwd+bwd ms | × eager (fwd+bwd) | peak extra MiB | mem / eager | floor ms | % of floor |"
    lines = [hdr, "|" + "---|" * 9]
    for r in rows:
        pct = 100 * r["floor_ms"] / r["fwd_bwd_ms"] if r["fwd_bwd_ms"] == r["fwd_bwd_ms"] else float("nan")
        lines.append(
            f"| {r['n']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
            f"{r.get('speedup_vs_eager', float('nan')):.2f} | {r['peak_mib']:.1f} | "
            f"{r.get('mem_vs_eager', float('nan')):.3f} | {r['floor_ms']:.3f} | {pct:.0f}% |"
            + (f" {r['note']}" if r.get("note") else ""))
    return "\n".join(lines)


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for impl in dict.fromkeys(r["impl"] for r in rows):
        pts = [(r["n"], r["fwd_bwd_ms"], r["peak_mib"]) for r in rows if r["impl"] == impl and r["fwd_bwd_ms"] == r["fwd_bwd_ms"]]
        if pts:
            a1.loglog([p[0] for p in pts], [p[1] for p in pts], "o-", label=impl)
            a2.loglog([p[0] for p in pts], [max(p[2], 1e-3) for p in pts], "o-", label=impl)
    a1.set(xlabel="batch N", ylabel="fwd+bwd median (ms)", title="time")
    a2.set(xlabel="batch N", ylabel="peak extra memory (MiB)", title="memory")
    a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _device_name(dev):
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
