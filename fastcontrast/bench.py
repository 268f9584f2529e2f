"""Speed and memory of every loss against its baselines, measured in one run.

``python -m fastcontrast bench [--ops clip,siglip] [--sizes 1024,4096] [--dim 512] [--dtype bfloat16] [--out DIR]``
prints a markdown table per op (min / median / max of forward and forward+backward time, peak extra memory,
ratios to the eager reference measured in the same run, and the floor: max(FLOPs / measured matmul rate,
bytes / measured copy rate)), a legend of the implementations, and writes ``bench.csv``, ``bench.md`` and
``bench.png`` (time and memory against batch size, log-log) to ``--out`` (default ``benchmarks/out``), saying
where. Rows whose spread is large (max > 1.5 × min) or whose forward exceeds forward+backward (a busy machine)
are flagged: rerun them before quoting them.

Baselines, each measured in the same run on the same inputs: the eager reference (materialises N×M), the
``torch.compile``d reference, open_clip's ``ClipLoss``/``SigLipLoss`` when importable, Inf-CL's single-GPU
``cal_flash_loss`` (both directions) when installed.
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


def time_ms(fn: Callable[[], object], dev: torch.device, warmup: int = 2, reps: int = 7,
            budget_s: float = 20.0) -> List[float]:
    """Wall times of ``fn`` in ms, one per repetition after ``warmup`` calls: CUDA events on GPU, perf_counter
    on CPU; stops early (after at least 3) once ``budget_s`` is spent."""
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
    return times


def median_ms(fn: Callable[[], object], dev: torch.device, warmup: int = 2, reps: int = 7,
              budget_s: float = 20.0, stat=statistics.median) -> float:
    """``stat`` (the median) of :func:`time_ms`."""
    return stat(time_ms(fn, dev, warmup, reps, budget_s))


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
def _open_clip_loss(name: str = "ClipLoss"):
    from ._compat import open_clip_loss_module

    mod = open_clip_loss_module()
    return None if mod is None else getattr(mod, name)()


def _inf_cl():
    """Inf-CL's single-GPU Triton loss; it is one-directional (rows → columns), so CLIP's loss is two calls."""
    try:
        from inf_cl import cal_flash_loss  # type: ignore  (cal_inf_loss needs a process group)
    except Exception:  # noqa: BLE001
        return None
    return lambda x, y, s: 0.5 * (cal_flash_loss(x, y, scale=s).mean() + cal_flash_loss(y, x, scale=s).mean())


def _siglip_kernel():
    """siglip-kernel 0.1.2's fused_siglip_loss (log-temperature and bias as tensors; its default routing: the
    chunked cuBLAS + fused BCE path for bf16/fp16); None when it is not installed."""
    try:
        from siglip_kernel import fused_siglip_loss  # type: ignore
    except Exception:  # noqa: BLE001
        return None
    return lambda x, y, scale, bias: fused_siglip_loss(x, y, scale.log(), bias)


def _import_error(module: str) -> str:
    try:
        __import__(module)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e)[:80]}"
    return "importable"


class Unavailable(RuntimeError):
    """A baseline that cannot run here: its row says why instead of vanishing."""


def _unavailable(reason: str) -> Callable:
    def fn(**_):
        raise Unavailable(reason)

    return fn


OPS = ("clip", "siglip", "oblique", "mmts", "mmts_margin", "codebook", "momentum", "clip_multipos", "distill")
_DISPATCH_OP = {"clip": "infonce", "siglip": "siglip", "oblique": "infonce", "mmts": "infonce",
                "mmts_margin": "max_margin", "codebook": "swapped_prediction", "momentum": "momentum_contrastive",
                "clip_multipos": "infonce", "distill": "distill"}

# What each implementation name in the tables means.
LEGEND = {
    "fastcontrast[triton]": "fused Triton kernels (tiled, never N×N; the default on CUDA)",
    "fastcontrast[cuda]": "fused CUDA kernels of csrc/ (backend='cuda')",
    "fastcontrast[cpu]": "fused C++ CPU kernels of csrc/ (BLAS row blocks; the default on CPU when built)",
    "fastcontrast[dense]": "the materialised path (backend='dense': one GEMM, N×N statistics; auto's pick when small)",
    "fastcontrast[torch-tiles]": "the same tiling in plain PyTorch blocks: what runs without the C++ extension",
    "reference (eager)": "fastcontrast's readable reference: materialises the N×N logits, eager PyTorch",
    "reference (compiled)": "the same reference under torch.compile (fused by Inductor, still N×N)",
    "open_clip ClipLoss": "open_clip.loss.ClipLoss (materialised logits)",
    "open_clip SigLipLoss": "open_clip.loss.SigLipLoss (materialised logits)",
    "open_clip DistillClipLoss": "open_clip.loss.DistillClipLoss (student and teacher logits materialised)",
    "Inf-CL (flash, 2 calls)": "Inf-CL's cal_flash_loss, once per direction (it is one-directional)",
    "siglip-kernel": "siglip-kernel 0.1.2 fused_siglip_loss (auto routing: chunked cuBLAS GEMM + fused BCE)",
}
for _v in ("baseline", "hopper_tiles", "hopper", "hopper_2cta"):
    LEGEND[f"fastcontrast[triton:{_v}]"] = f"the Triton kernels with launch-table variant {_v!r} (ops/_configs.py)"


def _codes(n: int) -> int:
    return max(16, min(4096, n // 4))


def make_inputs(op: str, n: int, d: int, dev: torch.device, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Fresh random leaves (requires_grad where the loss is differentiable) for one op at batch n."""
    g = torch.Generator().manual_seed(n)

    def feat(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1).to(dev, dtype).requires_grad_()

    def scalar(v):
        return torch.tensor(v, device=dev, requires_grad=True)

    def mmts_tau():  # MM-TS: τ_i(t) from dataset-wide cluster sizes (one τ per pair)
        sizes = torch.randint(1, 1000, (n,), generator=g)
        return Fn.mmts_temperature(sizes, 100, 10_000, 1, 999).to(dev)

    if op == "clip":
        return {"image_features": feat(n, d), "text_features": feat(n, d), "logit_scale": scalar(14.3)}
    if op == "siglip":
        return {"image_features": feat(n, d), "text_features": feat(n, d), "logit_scale": scalar(10.0),
                "logit_bias": scalar(-10.0)}
    if op == "oblique":
        return {"image_tokens": feat(n, 16, d // 16), "text_tokens": feat(n, 16, d // 16)}  # Sun: K = 16, scale 1
    if op == "mmts":
        return {"image_features": feat(n, d), "text_features": feat(n, d), "tau_image": mmts_tau()}
    if op == "mmts_margin":
        return {"image_features": feat(n, d), "text_features": feat(n, d), "margin": mmts_tau()}
    if op == "codebook":
        out = {k: feat(n, d) for k in ("image_features", "text_features")}
        out.update({k: feat(n, d).detach() for k in ("teacher_image_features", "teacher_text_features")})
        out["codebook"] = feat(_codes(n), d)
        return out
    if op == "clip_multipos":  # group ids: about 5 captions per image id (COCO-like), shared by both sides
        ids = torch.randint(0, max(1, n // 5), (n,), generator=g).to(dev)
        return {"image_features": feat(n, d), "text_features": feat(n, d), "logit_scale": scalar(14.3),
                "image_ids": ids, "text_ids": ids}
    if op == "distill":  # open_clip's --distill: student features and scale, a teacher's features and scale
        return {"image_features": feat(n, d), "text_features": feat(n, d), "logit_scale": scalar(14.3),
                "teacher_image_features": feat(n, d).detach(), "teacher_text_features": feat(n, d).detach(),
                "teacher_logit_scale": torch.tensor(100.0, device=dev)}
    if op == "momentum":  # ALBEF/CODIS instance term: N queries against N teacher keys + a queue of 4N
        return {"query": feat(n, d), "keys": feat(n, d).detach(), "teacher_query": feat(n, d).detach(),
                "queue": feat(4 * n, d).detach(), "logit_scale": scalar(1 / 0.07)}
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def loss_fn(op: str, backend: str) -> Callable[..., torch.Tensor]:
    return {
        "clip": lambda **kw: Fn.clip_loss(**kw, backend=backend),
        "siglip": lambda **kw: Fn.siglip_loss(**kw, backend=backend),
        "oblique": lambda **kw: Fn.oblique_clip_loss(**kw, backend=backend),
        "mmts": lambda **kw: Fn.adaptive_temperature_clip_loss(**kw, backend=backend),
        "mmts_margin": lambda **kw: Fn.max_margin_loss(**kw, backend=backend),
        "codebook": lambda **kw: Fn.codebook_loss(**kw, tau=0.1, epsilon=0.05, n_iters=3, backend=backend),
        "momentum": lambda **kw: Fn.momentum_contrastive_loss(**kw, alpha=0.4, backend=backend),
        "clip_multipos": lambda **kw: Fn.clip_loss(**kw, backend=backend),
        "distill": lambda **kw: sum(Fn.distill_clip_loss(**kw, backend=backend)),  # contrastive + distill
    }[op]


def flops(op: str, n: int, d: int) -> float:
    """Floor of forward+backward in FLOPs: the pairwise similarity once, then one GEMM each for the gradients
    that exist (3 units of 2·N·M·d; the symmetric losses need both feature gradients)."""
    if op == "codebook":  # two sides × (scores + 2 grad GEMMs) + two teacher score matrices
        return 2 * 6 * n * _codes(n) * d + 2 * 2 * n * _codes(n) * d
    if op == "momentum":  # student scores + the query gradient, plus the teacher's soft-target pass (2 GEMMs)
        m = 5 * n
        return 2 * n * m * d * 2 + 2 * n * m * d * 2
    if op == "distill":  # the student's S and its two gradient GEMMs, plus the teacher's S once
        return 8 * n * n * d
    return 6 * n * n * d


def bytes_floor(op: str, n: int, d: int, elt: int) -> float:
    """Each input read once, each gradient written once."""
    if op == "codebook":
        k = _codes(n)
        return (4 * n * d + k * d + 2 * n * d + k * d) * elt
    if op == "momentum":
        return (3 * n * d + 4 * n * d + n * d) * elt
    if op == "distill":
        return 6 * n * d * elt
    return 4 * n * d * elt


def _with_variant(name: str, fn: Callable) -> Callable:
    """``fn`` run with launch-table variant ``name``; left selected, so the backward that follows (outside this
    call) launches the same variant; the next candidate selects its own."""
    from .ops import _configs

    def run(**kw):
        _configs.set_variant(name)
        return fn(**kw)

    return run


def candidates(op: str, dev: torch.device, with_compile: bool = True, variants: Optional[List[str]] = None,
               explain_missing: bool = False) -> Dict[str, Callable]:
    """name -> loss(**inputs) for every implementation of ``op`` available on ``dev``, baselines included.

    ``variants``: the Triton backend once per launch-table variant ("fastcontrast[triton:<variant>]", for A/B
    runs; Triton on the CPU only under TRITON_INTERPRET). ``explain_missing``: a baseline that cannot run here
    (not installed, needs CUDA) stays as a row whose note says why."""
    out: Dict[str, Callable] = {}
    from .dispatch import available_backends

    if variants:
        from .dispatch import unavailable_reason

        why = unavailable_reason(_DISPATCH_OP[op], "triton", dev)
        for v in variants:
            out[f"fastcontrast[triton:{v}]"] = (_with_variant(v, loss_fn(op, "triton")) if why is None
                                               else _unavailable(f"triton: {why}"))
        return out
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
    if op == "siglip":
        oc = _open_clip_loss("SigLipLoss")
        if oc is not None:
            out["open_clip SigLipLoss"] = lambda image_features, text_features, logit_scale, logit_bias: oc(
                image_features, text_features, logit_scale, logit_bias)
        elif explain_missing:
            out["open_clip SigLipLoss"] = _unavailable(f"open_clip: {_import_error('open_clip')}")
        sk = _siglip_kernel()
        if sk is not None and dev.type == "cuda":
            out["siglip-kernel"] = lambda image_features, text_features, logit_scale, logit_bias: sk(
                image_features, text_features, logit_scale, logit_bias)
        elif explain_missing:
            out["siglip-kernel"] = _unavailable("needs CUDA" if sk is not None
                                                else f"siglip_kernel: {_import_error('siglip_kernel')}")
    if op == "distill":
        oc = _open_clip_loss("DistillClipLoss")
        if oc is not None:
            out["open_clip DistillClipLoss"] = lambda **kw: sum(oc(
                kw["image_features"], kw["text_features"], kw["logit_scale"], kw["teacher_image_features"],
                kw["teacher_text_features"], kw["teacher_logit_scale"]))
    if op == "clip":
        oc = _open_clip_loss()
        if oc is not None:
            out["open_clip ClipLoss"] = lambda image_features, text_features, logit_scale: oc(
                image_features, text_features, logit_scale)
        elif explain_missing:
            out["open_clip ClipLoss"] = _unavailable(f"open_clip: {_import_error('open_clip')}")
        inf = _inf_cl()
        if inf is not None and dev.type == "cuda":
            out["Inf-CL (flash, 2 calls)"] = lambda image_features, text_features, logit_scale: inf(
                image_features, text_features, logit_scale)
        elif explain_missing:
            out["Inf-CL (flash, 2 calls)"] = _unavailable("needs CUDA" if inf is not None
                                                          else f"inf_cl: {_import_error('inf_cl')}")
    return out


# ------------------------------------------------------------------------------------------------ the sweep
SPREAD_FLAG = 1.5  # max/min of the repetitions above this: the row is noisy


def _progress(i: int, total: int, label: str, stream=sys.stderr) -> None:
    """A progress bar on stderr (no dependency): one self-overwriting line on a terminal, a line per row in a log."""
    width = 24
    done = int(width * i / max(total, 1))
    line = f"[{'#' * done}{'.' * (width - done)}] {i}/{total} {label[:60]}"
    if stream.isatty():
        stream.write(f"\r{line:<100}" + ("\n" if i == total else ""))
    else:
        stream.write(line + "\n")
    stream.flush()


def _stats(prefix: str, times: List[float]) -> dict:
    return {f"{prefix}_min_ms": min(times), f"{prefix}_ms": statistics.median(times), f"{prefix}_max_ms": max(times)}


def _flags(row: dict) -> List[str]:
    out = []
    if row.get("fwd_bwd_min_ms", 0) > 0 and row["fwd_bwd_max_ms"] / row["fwd_bwd_min_ms"] > SPREAD_FLAG:
        out.append(f"spread {row['fwd_bwd_max_ms'] / row['fwd_bwd_min_ms']:.1f}×")
    if row["fwd_ms"] > row["fwd_bwd_ms"]:
        out.append("fwd > fwd+bwd")
    return out


STREAM_FIELDS = ("op", "n", "d", "impl", "fwd_min_ms", "fwd_ms", "fwd_max_ms", "fwd_bwd_min_ms", "fwd_bwd_ms",
                 "fwd_bwd_max_ms", "peak_mib", "floor_ms", "bound", "note")


def _stream_line(r: dict) -> str:
    """One measured row as a markdown line, printed (and flushed) the moment it is measured."""
    return (f"| {r['op']} | {r['n']} | {r['impl']} | {r['fwd_min_ms']:.3f} / {r['fwd_ms']:.3f} / {r['fwd_max_ms']:.3f} | "
            f"{r['fwd_bwd_min_ms']:.3f} / {r['fwd_bwd_ms']:.3f} / {r['fwd_bwd_max_ms']:.3f} | {r['peak_mib']:.1f} | "
            f"{r['floor_ms']:.3f} | {r.get('note', '')} |")


def run(sizes: List[int], dim: int, dtype: torch.dtype, dev: torch.device, out_dir: Optional[str] = None,
        with_compile: bool = True, reps: int = 7, ops=OPS, impls: Optional[List[str]] = None, log=print,
        progress: bool = True, variants: Optional[List[str]] = None, explain_missing: bool = False,
        stream_csv: Optional[str] = None, compile_max: Optional[int] = None, stream: bool = False):
    """The sweep. ``stream``: print each row as a markdown line the moment it is measured; ``stream_csv``: append
    it to this CSV (header first), flushed, so a run stopped at any point keeps every row measured so far.
    ``compile_max``: the torch.compile'd reference only up to this N (each N compiles anew)."""
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise ValueError(f"ops: unknown {unknown}; expected some of {OPS}")
    sink = None
    if stream_csv:
        os.makedirs(os.path.dirname(os.path.abspath(stream_csv)), exist_ok=True)
        fresh = not os.path.exists(stream_csv) or os.path.getsize(stream_csv) == 0
        sink = open(stream_csv, "a", newline="")
        writer = csv.DictWriter(sink, fieldnames=STREAM_FIELDS, extrasaction="ignore")
        if fresh:
            writer.writeheader()
            sink.flush()
    peak = matmul_tflops(dev, dtype)
    bw = copy_gbps(dev)
    log(f"# device: {_device_name(dev)}; dtype {str(dtype).replace('torch.', '')}; d = {dim}; "
        f"measured matmul {peak:.1f} TFLOP/s, copy {bw:.0f} GB/s (read + write); {reps} repetitions per row")
    if stream:
        log("| op | N | impl | fwd ms (min/med/max) | fwd+bwd ms (min/med/max) | peak extra MiB | floor ms | note |\n"
            "|---|---|---|---|---|---|---|---|")
    rows = []
    cand_kw = dict(with_compile=with_compile, variants=variants, explain_missing=explain_missing)
    work = [(op, n, name) for op in ops for n in sizes for name in candidates(op, dev, **cand_kw)  # lazy
            if (not impls or any(k in name for k in impls))
            and not (compile_max is not None and n > compile_max and "compiled" in name)]
    cands, inputs, key = {}, {}, None
    for i, (op, n, name) in enumerate(work):
        if progress:
            _progress(i, len(work), f"{op} N={n} {name}")
        if op not in cands:
            cands = {op: candidates(op, dev, **cand_kw)}
        if key != (op, n):
            key, inputs = (op, n), make_inputs(op, n, dim, dev, dtype)
        fn = cands[op][name]
        leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]

        def fwd():
            with torch.no_grad():
                return fn(**inputs)

        def fwd_bwd():
            for t in leaves:
                t.grad = None
            fn(**inputs).backward()

        row = {"op": op, "n": n, "d": dim, "impl": name}
        try:
            row.update(_stats("fwd", time_ms(fwd, dev, reps=reps)))
            row.update(_stats("fwd_bwd", time_ms(fwd_bwd, dev, reps=reps)))
            row["peak_mib"] = peak_extra_bytes(fwd_bwd, dev) / 2**20
            notes = _flags(row)
            if dev.type == "cpu" and "compiled" in name:
                # the CPU tracker is a dispatch mode, under which the compiled graph is not what runs
                row["peak_mib"] = float("nan")
                notes.append("CPU peak not measurable for compiled graphs")
            if notes:
                row["note"] = "; ".join(notes)
        except torch.cuda.OutOfMemoryError:
            row.update(_stats("fwd", [float("nan")]), **_stats("fwd_bwd", [float("nan")]), peak_mib=float("nan"),
                       note="OOM")
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            msg = str(e) if isinstance(e, Unavailable) else f"{type(e).__name__}: {str(e)[:60]}"
            row.update(_stats("fwd", [float("nan")]), **_stats("fwd_bwd", [float("nan")]), peak_mib=float("nan"),
                       note=msg)
        elt = torch.finfo(dtype).bits // 8
        t_flop, t_byte = flops(op, n, dim) / (peak * 1e12), bytes_floor(op, n, dim, elt) / (bw * 1e9)
        row["floor_ms"], row["bound"] = max(t_flop, t_byte) * 1e3, "compute" if t_flop > t_byte else "memory"
        rows.append(row)
        if stream:
            log(_stream_line(row))
            sys.stdout.flush()
        if sink is not None:
            writer.writerow(row)
            sink.flush()
            os.fsync(sink.fileno())
    if variants:
        from .ops import _configs

        _configs.set_variant(None)
    if sink is not None:
        sink.close()
    if progress:
        _progress(len(work), len(work), "done")
    _ratios(rows)
    table = to_markdown(rows)
    log(table)
    log(legend(rows))
    if out_dir:
        out_dir = os.path.abspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "bench.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
            w.writeheader()
            w.writerows(rows)
        with open(os.path.join(out_dir, "bench.md"), "w") as f:
            f.write(table + "\n\n" + legend(rows) + "\n")
        png = plot(rows, os.path.join(out_dir, "bench.png"))
        log(f"\nwrote {out_dir}/bench.csv, bench.md" + (", bench.png" if png else "")
            + ("" if png else "\nno bench.png: matplotlib is not installed (pip install matplotlib, or "
                              "pip install 'fastcontrast[bench]')"))
    return rows


def legend(rows) -> str:
    names = list(dict.fromkeys(r["impl"] for r in rows))
    lines = ["Implementations:"] + [f"- {n}: {LEGEND.get(n, '')}" for n in names]
    lines.append(f"Times: min / median / max of the repetitions (ms). Flagged: spread max/min > {SPREAD_FLAG}, "
                 "or forward slower than forward+backward (a busy machine: rerun before quoting).")
    lines.append("floor: max(FLOPs / measured matmul rate, bytes / measured copy rate) of forward+backward.")
    return "\n".join(lines)


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
    hdr = ("| op | N | impl | fwd ms (min/med/max) | fwd+bwd ms (min/med/max) | × eager | peak extra MiB | "
           "mem / eager | floor ms | floor / time | note |")
    lines = [hdr, "|" + "---|" * 11]
    for r in rows:
        pct = 100 * r["floor_ms"] / r["fwd_bwd_ms"] if r["fwd_bwd_ms"] == r["fwd_bwd_ms"] else float("nan")
        lines.append(
            f"| {r['op']} | {r['n']} | {r['impl']} | {r['fwd_min_ms']:.3f} / {r['fwd_ms']:.3f} / {r['fwd_max_ms']:.3f} | "
            f"{r['fwd_bwd_min_ms']:.3f} / {r['fwd_bwd_ms']:.3f} / {r['fwd_bwd_max_ms']:.3f} | "
            f"{r.get('speedup_vs_eager', float('nan')):.2f} | {r['peak_mib']:.1f} | "
            f"{r.get('mem_vs_eager', float('nan')):.3f} | {r['floor_ms']:.3f} | {pct:.0f}% | {r.get('note', '')} |")
    return "\n".join(lines)


def plot(rows, path) -> bool:
    """Time and memory against N per op; False (nothing written) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return False
    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(len(ops), 2, figsize=(11, 3.6 * len(ops)), squeeze=False)
    for (a1, a2), op in zip(axes, ops):
        sub = [r for r in rows if r["op"] == op]
        for impl in dict.fromkeys(r["impl"] for r in sub):
            pts = [(r["n"], r["fwd_bwd_ms"], r["fwd_bwd_min_ms"], r["fwd_bwd_max_ms"], r["peak_mib"]) for r in sub
                   if r["impl"] == impl and r["fwd_bwd_ms"] == r["fwd_bwd_ms"]]
            if pts:
                xs = [p[0] for p in pts]
                a1.errorbar(xs, [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                            fmt="o-", capsize=3, label=impl)
                a2.plot(xs, [max(p[4], 1e-3) if p[4] == p[4] else float("nan") for p in pts], "o-", label=impl)
        for ax in (a1, a2):
            ax.set_xscale("log")
            ax.set_yscale("log")
        a1.set(xlabel="batch N", ylabel="fwd+bwd ms (median, min–max)", title=f"{op}: time")
        a2.set(xlabel="batch N", ylabel="peak extra memory (MiB)", title=f"{op}: memory")
        a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _device_name(dev):
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


# ------------------------------------------------------------------------------------------------ A/B of variants
def ab_table(rows, arch: str) -> str:
    """The launch-table A/B: fwd+bwd median per variant for every (op, N), the ratio to "baseline", the best;
    then the variant with the smallest geometric mean over all of them, as the line to paste into
    ops/_configs.DEFAULT_VARIANT (a variant with a failed row is not chosen)."""
    import math

    ab = [r for r in rows if r["impl"].startswith("fastcontrast[triton:")]
    if not ab:
        return "no A/B rows"
    names = list(dict.fromkeys(r["impl"][len("fastcontrast[triton:"):-1] for r in ab))
    by = {}
    for r in ab:
        by.setdefault((r["op"], r["n"]), {})[r["impl"][len("fastcontrast[triton:"):-1]] = r
    lines = [f"| arch | op | N | " + " | ".join(f"{v} fwd+bwd ms (fwd)" for v in names) + " | best |",
             "|" + "---|" * (len(names) + 4)]
    logs = {v: [] for v in names}
    for (op, n), per in by.items():
        base = per.get("baseline", {}).get("fwd_bwd_ms", float("nan"))
        cells, best = [], None
        for v in names:
            r = per.get(v)
            t = r["fwd_bwd_ms"] if r else float("nan")
            if t == t:
                logs[v].append(math.log(t))
                if best is None or t < per[best]["fwd_bwd_ms"]:
                    best = v
            else:
                logs[v].append(float("nan"))
            ratio = f" ×{base / t:.2f}" if t == t and base == base and v != "baseline" else ""
            cells.append(f"{t:.3f}{ratio} ({r['fwd_ms']:.3f})" if r and t == t else
                         f"- ({(r or {}).get('note', 'not run')})")
        lines.append(f"| {arch} | {op} | {n} | " + " | ".join(cells) + f" | {best or '-'} |")
    score = {v: sum(x) / len(x) for v, x in logs.items() if x and all(y == y for y in x)}
    if score:
        win = min(score, key=score.get)
        lines.append(f"\nGeometric mean fwd+bwd over the rows: " + ", ".join(
            f"{v} {math.exp(sc):.3f} ms" for v, sc in sorted(score.items(), key=lambda kv: kv[1])))
        lines.append(f"Paste into fastcontrast/ops/_configs.py: DEFAULT_VARIANT[{arch!r}] = {win!r}")
    else:
        lines.append("\nno variant ran every row: nothing to paste")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m fastcontrast.bench``: the bench with streaming rows and launch-table variants (the options
    ``python -m fastcontrast bench`` has, plus --variants, --stream-csv, --compile-max, --explain-missing)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m fastcontrast.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", default="clip,siglip")
    p.add_argument("--sizes", default=None)
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--impls", default=None, help="comma-separated substrings of implementation names to keep")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-max", type=int, default=None, help="torch.compile'd reference only up to this N")
    p.add_argument("--variants", default=None, help="A/B: the Triton backend once per launch-table variant "
                   "(comma-separated, or 'all'), nothing else; ends with the per-arch table")
    p.add_argument("--explain-missing", action="store_true", help="baselines that cannot run stay as rows saying why")
    p.add_argument("--stream-csv", default=None, help="append each row to this CSV the moment it is measured")
    p.add_argument("--out", default=None, help="also write bench.csv/bench.md/bench.png here at the end")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = dev.type == "cuda"
    sizes = [int(v) for v in (a.sizes or ("4096,16384,65536" if gpu else "256,512")).split(",")]
    dtype = getattr(torch, a.dtype or ("bfloat16" if gpu else "float32"))
    variants = None
    if a.variants:
        from .ops._configs import VARIANTS

        variants = list(VARIANTS) if a.variants == "all" else a.variants.split(",")
        bad = [v for v in variants if v not in VARIANTS]
        if bad:
            p.error(f"--variants: unknown {bad}; expected some of {sorted(VARIANTS)}")
    rows = run(sizes, a.dim or (768 if gpu else 64), dtype, dev, out_dir=a.out, with_compile=not a.no_compile,
               reps=a.reps, ops=tuple(a.ops.split(",")), impls=a.impls.split(",") if a.impls else None,
               progress=not a.no_progress, variants=variants, explain_missing=a.explain_missing,
               stream_csv=a.stream_csv, compile_max=a.compile_max, stream=True)
    if variants:
        from .ops._configs import arch_of

        arch = arch_of(dev) if gpu else "interpreter"
        print("\n## Launch-table A/B (" + _device_name(dev) + ")\n\n" + ab_table(rows, arch), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
