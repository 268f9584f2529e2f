"""Speed and memory of the InfoNCE family against its baselines, measured in one run.

``python -m fastcontrast bench [--ops clip,margin] [--sizes 1024,4096] [--dim 512] [--dtype bfloat16] [--out DIR]``
prints a markdown table per op (median forward and forward+backward time, peak extra memory, ratios to the eager
reference, and the floor: max(FLOPs / measured matmul rate, bytes / measured copy rate)) and writes
``bench.csv``, ``bench.md`` and ``bench.png`` (time and memory against batch size, log-log; needs matplotlib).

Baselines, each measured in the same run on the same inputs: the eager reference (materialises N×M), the
``torch.compile``d reference, open_clip's ``ClipLoss`` when importable, Inf-CL's single-GPU ``cal_flash_loss`` (both directions) when installed.
"""
from __future__ import annotations

import csv
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from . import functional as Fn


# ------------------------------------------------------------------------------------------------ measuring
def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], dev: torch.device, warmup: int = 2, reps: int = 7,
              budget_s: float = 20.0, stat=statistics.median) -> float:
    """Median (or ``stat``) wall time of ``fn`` in ms: CUDA events on GPU, perf_counter on CPU; no warm-up."""
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
    return stat(times)


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
    n = 8192 if dev.type == "cuda" else 2048
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    ms = median_ms(lambda: a @ b, dev, warmup=3, reps=10, stat=min)  # a ceiling: the best run
    return 2 * n**3 / (ms * 1e-3) / 1e12


def copy_gbps(dev: torch.device) -> float:
    """Measured device-to-device copy rate, bytes read + written (the memory ceiling)."""
    n = (1 << 28) if dev.type == "cuda" else (1 << 24)
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    ms = median_ms(lambda: b.copy_(a), dev, warmup=3, reps=10, stat=min)
    return 2 * n / (ms * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------------ candidates
def _open_clip_loss():
    from ._compat import open_clip_loss_module

    mod = open_clip_loss_module()
    return None if mod is None else mod.ClipLoss()


def _inf_cl():
    """Inf-CL's single-GPU Triton loss; it is one-directional (rows → columns), so CLIP's loss is two calls."""
    try:
        from inf_cl import cal_flash_loss  # type: ignore  (cal_inf_loss needs a process group)
    except Exception:  # noqa: BLE001
        return None
    return lambda x, y, s: 0.5 * (cal_flash_loss(x, y, scale=s).mean() + cal_flash_loss(y, x, scale=s).mean())


OPS = ("clip", "oblique", "adaptive", "margin", "codebook")
_DISPATCH_OP = {"clip": "infonce", "oblique": "infonce", "adaptive": "infonce", "margin": "max_margin",
                "codebook": "swapped_prediction"}


def _codes(n: int) -> int:
    return max(16, min(4096, n // 4))


def make_inputs(op: str, n: int, d: int, dev: torch.device, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Fresh random leaves (requires_grad where the loss is differentiable) for one op at batch n."""
    g = torch.Generator().manual_seed(n)

    def feat(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1).to(dev, dtype).requires_grad_()

    def scalar(v):
        return torch.tensor(v, device=dev, requires_grad=True)

    if op == "clip":
        return {"image_features": feat(n, d), "text_features": feat(n, d), "logit_scale": scalar(14.3)}
    if op == "oblique":
        return {"image_tokens": feat(n, 4, d // 4), "text_tokens": feat(n, 4, d // 4), "logit_scale": scalar(4.0)}
    if op == "adaptive":
        tau = lambda: (0.02 + 0.08 * torch.rand(n, generator=g)).to(dev).requires_grad_()  # noqa: E731
        return {"image_features": feat(n, d), "text_features": feat(n, d), "tau_image": tau(), "tau_text": tau()}
    if op == "margin":
        return {"image_features": feat(n, d), "text_features": feat(n, d)}
    if op == "codebook":
        out = {k: feat(n, d) for k in ("image_features", "text_features")}
        out.update({k: feat(n, d).detach() for k in ("teacher_image_features", "teacher_text_features")})
        out["codebook"] = feat(_codes(n), d)
        return out
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def loss_fn(op: str, backend: str) -> Callable[..., torch.Tensor]:
    return {
        "clip": lambda **kw: Fn.clip_loss(**kw, backend=backend),
        "oblique": lambda **kw: Fn.oblique_clip_loss(**kw, backend=backend),
        "adaptive": lambda **kw: Fn.adaptive_temperature_clip_loss(**kw, normalize=True, backend=backend),
        "margin": lambda **kw: Fn.max_margin_loss(**kw, margin=0.2, backend=backend),
        "codebook": lambda **kw: Fn.codebook_loss(**kw, tau=0.1, epsilon=0.05, n_iters=3, backend=backend),
    }[op]


def flops(op: str, n: int, d: int) -> float:
    """Floor of forward+backward: the similarity once, then one GEMM each for the two feature gradients."""
    if op == "codebook":  # two sides × (scores + 2 grad GEMMs) + two teacher score matrices
        return 2 * 6 * n * _codes(n) * d + 2 * 2 * n * _codes(n) * d
    return 6 * n * n * d


def bytes_floor(op: str, n: int, d: int, elt: int) -> float:
    """Each input read once, each gradient written once."""
    k = _codes(n) if op == "codebook" else 0
    ins = (4 * n * d + k * d) if op == "codebook" else 2 * n * d
    grads = (2 * n * d + k * d) if op == "codebook" else 2 * n * d
    return (ins + grads) * elt


def candidates(op: str, dev: torch.device, with_compile: bool = True) -> Dict[str, Callable]:
    """name -> loss(**inputs) for every implementation of ``op`` available on ``dev``, baselines included."""
    out: Dict[str, Callable] = {}
    from .dispatch import available_backends

    for fused in available_backends(_DISPATCH_OP[op], dev):  # every fast backend that runs here, auto's first
        if fused != "reference" and not (fused == "triton" and dev.type == "cpu"):
            out[f"fastcontrast[{fused}]"] = loss_fn(op, fused)
    if op == "clip" and dev.type == "cpu" and "TRITON_INTERPRET" not in os.environ:
        # the blockwise PyTorch tiles behind the custom op: what runs on CPU without the C++ extension
        from .ops.infonce.function import infonce_fused

        def tiles(image_features, text_features, logit_scale):
            n = image_features.shape[0]
            s = logit_scale.expand(n)
            return infonce_fused(image_features, text_features, s, s, None,
                                 torch.arange(n, device=image_features.device), False, 1, "torch")

        out["fastcontrast[torch-tiles]"] = tiles
    out["reference (eager)"] = loss_fn(op, "reference")
    if with_compile:
        out["reference (compiled)"] = torch.compile(loss_fn(op, "reference"), dynamic=False)
    if op == "clip":
        oc = _open_clip_loss()
        if oc is not None:
            out["open_clip ClipLoss"] = lambda image_features, text_features, logit_scale: oc(
                image_features, text_features, logit_scale)
        inf = _inf_cl()
        if inf is not None and dev.type == "cuda":
            out["Inf-CL (flash, 2 calls)"] = lambda image_features, text_features, logit_scale: inf(
                image_features, text_features, logit_scale)
    return out


# ------------------------------------------------------------------------------------------------ the sweep
def run(sizes: List[int], dim: int, dtype: torch.dtype, dev: torch.device, out_dir: Optional[str] = None,
        with_compile: bool = True, reps: int = 7, ops=OPS, impls: Optional[List[str]] = None, log=print):
    peak = matmul_tflops(dev, dtype)
    bw = copy_gbps(dev)
    log(f"# device: {_device_name(dev)}; dtype {str(dtype).replace('torch.', '')}; d = {dim}; "
        f"measured matmul {peak:.1f} TFLOP/s, copy {bw:.0f} GB/s (read + write)")
    rows = []
    work = [(op, n, name) for op in ops for n in sizes for name in candidates(op, dev, with_compile)  # lazy
            if not impls or any(k in name for k in impls)]
    try:
        from tqdm import tqdm  # progress bar when available
        it = tqdm(work, file=sys.stderr, leave=False)
    except Exception:  # noqa: BLE001
        it = work
    cands, inputs, key = {}, {}, None
    for op, n, name in it:
        if op not in cands:
            cands = {op: candidates(op, dev, with_compile)}
        if key != (op, n):
            key, inputs = (op, n), make_inputs(op, n, dim, dev, dtype)
        fn = cands[op][name]
        leaves = [t for t in inputs.values() if t.requires_grad]

        def fwd():
            with torch.no_grad():
                return fn(**inputs)

        def fwd_bwd():
            for t in leaves:
                t.grad = None
            fn(**inputs).backward()

        row = {"op": op, "n": n, "d": dim, "impl": name}
        try:
            row["fwd_ms"] = median_ms(fwd, dev, reps=reps)
            row["fwd_bwd_ms"] = median_ms(fwd_bwd, dev, reps=reps)
            row["peak_mib"] = peak_extra_bytes(fwd_bwd, dev) / 2**20
            if dev.type == "cpu" and "compiled" in name:
                # the CPU tracker is a dispatch mode, under which the compiled graph is not what runs
                row["peak_mib"], row["note"] = float("nan"), "CPU peak not measurable for compiled graphs"
        except torch.cuda.OutOfMemoryError:
            row.update(fwd_ms=float("nan"), fwd_bwd_ms=float("nan"), peak_mib=float("nan"), note="OOM")
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            row.update(fwd_ms=float("nan"), fwd_bwd_ms=float("nan"), peak_mib=float("nan"),
                       note=f"{type(e).__name__}: {str(e)[:60]}")
        row["floor_ms"] = max(flops(op, n, dim) / (peak * 1e12),
                              bytes_floor(op, n, dim, torch.finfo(dtype).bits // 8) / (bw * 1e9)) * 1e3
        row["bound"] = "compute" if flops(op, n, dim) / peak / 1e12 > bytes_floor(
            op, n, dim, torch.finfo(dtype).bits // 8) / bw / 1e9 else "memory"
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
    by_n: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        by_n.setdefault((r["op"], r["n"]), {})[r["impl"]] = r
    for n, impls in by_n.items():
        base = impls.get("reference (eager)")
        for r in impls.values():
            if base and base.get("fwd_bwd_ms") == base.get("fwd_bwd_ms") and r["fwd_bwd_ms"] == r["fwd_bwd_ms"]:
                r["speedup_vs_eager"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
                r["mem_vs_eager"] = r["peak_mib"] / base["peak_mib"] if base["peak_mib"] else float("nan")


def to_markdown(rows) -> str:
    hdr = ("| op | N | impl | fwd ms | fwd+bwd ms | × eager (fwd+bwd) | peak extra MiB | mem / eager | "
           "floor ms | floor / time |")
    lines = [hdr, "|" + "---|" * 10]
    for r in rows:
        pct = 100 * r["floor_ms"] / r["fwd_bwd_ms"] if r["fwd_bwd_ms"] == r["fwd_bwd_ms"] else float("nan")
        lines.append(
            f"| {r['op']} | {r['n']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
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
    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(len(ops), 2, figsize=(11, 3.6 * len(ops)), squeeze=False)
    for (a1, a2), op in zip(axes, ops):
        sub = [r for r in rows if r["op"] == op]
        for impl in dict.fromkeys(r["impl"] for r in sub):
            pts = [(r["n"], r["fwd_bwd_ms"], r["peak_mib"]) for r in sub
                   if r["impl"] == impl and r["fwd_bwd_ms"] == r["fwd_bwd_ms"]]
            if pts:
                a1.loglog([p[0] for p in pts], [p[1] for p in pts], "o-", label=impl)
                a2.loglog([p[0] for p in pts], [max(p[2], 1e-3) for p in pts], "o-", label=impl)
        a1.set(xlabel="batch N", ylabel="fwd+bwd median (ms)", title=f"{op}: time")
        a2.set(xlabel="batch N", ylabel="peak extra memory (MiB)", title=f"{op}: memory")
        a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _device_name(dev):
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
