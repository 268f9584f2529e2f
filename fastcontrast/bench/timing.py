"""Timing, peak memory and the measured ceilings of the bench, and the rows it streams."""
from __future__ import annotations

import csv
import gc
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch



# ------------------------------------------------------------------------------------------------ measuring
def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], dev: torch.device, warmup: int = 2, reps: int = 7,
            budget_s: float = 20.0, warmup_s: float = 0.0) -> List[float]:
    """Wall times of ``fn`` in ms, one per repetition after ``warmup`` calls (more, up to 20, until ``warmup_s``
    seconds are spent: fast calls get the clocks up, slow ones pay one): CUDA events on GPU, perf_counter on
    CPU; stops early (after at least 3) once ``budget_s`` is spent."""
    t0 = time.perf_counter()
    for i in range(20):
        if i >= warmup and time.perf_counter() - t0 >= warmup_s:
            break
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
    from ..tools.memtrack import PeakMemory

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


def _device_name(dev):
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


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


_NAN_ROW = {k: float("nan") for k in ("fwd_min_ms", "fwd_ms", "fwd_max_ms", "fwd_bwd_min_ms", "fwd_bwd_ms",
                                       "fwd_bwd_max_ms", "peak_mib")}


def _flags(row: dict) -> List[str]:
    out = []
    if row.get("fwd_bwd_min_ms", 0) > 0 and row["fwd_bwd_max_ms"] / row["fwd_bwd_min_ms"] > SPREAD_FLAG:
        out.append(f"spread {row['fwd_bwd_max_ms'] / row['fwd_bwd_min_ms']:.1f}×")
    if row["fwd_ms"] > row["fwd_bwd_ms"]:
        out.append("fwd > fwd+bwd")
    return out


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


STREAM_FIELDS = ("op", "n", "d", "impl", "fwd_min_ms", "fwd_ms", "fwd_max_ms", "fwd_bwd_min_ms", "fwd_bwd_ms",
                 "fwd_bwd_max_ms", "peak_mib", "floor_ms", "bound", "note")


def _stream_line(r: dict) -> str:
    """One measured row as a markdown line, printed (and flushed) the moment it is measured."""
    return (f"| {r['op']} | {r['n']} | {r['impl']} | {r['fwd_min_ms']:.3f} / {r['fwd_ms']:.3f} / {r['fwd_max_ms']:.3f} | "
            f"{r['fwd_bwd_min_ms']:.3f} / {r['fwd_bwd_ms']:.3f} / {r['fwd_bwd_max_ms']:.3f} | {r['peak_mib']:.1f} | "
            f"{r['floor_ms']:.3f} | {r.get('note', '')} |")


class _Sink:
    """Rows appended to a CSV the moment each is measured (header first, flushed and synced)."""

    def __init__(self, path: Optional[str]):
        self.f = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            fresh = not os.path.exists(path) or os.path.getsize(path) == 0
            self.f = open(path, "a", newline="")
            self.w = csv.DictWriter(self.f, fieldnames=STREAM_FIELDS, extrasaction="ignore")
            if fresh:
                self.w.writeheader()
                self.f.flush()

    def write(self, row: dict) -> None:
        if self.f is not None:
            self.w.writerow(row)
            self.f.flush()
            os.fsync(self.f.fileno())

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def _leaves(inputs) -> List[torch.Tensor]:
    return [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]


def phases(fn: Callable, inputs: Dict[str, torch.Tensor]):
    """(fwd, fwd_bwd) closures of one loss on ``inputs``: the training forward (the output dropped), and the
    forward and ``.backward()`` after dropping the leaves' last gradients (so each call is one step)."""
    leaves = _leaves(inputs)

    def fwd():
        fn(**inputs)

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        fn(**inputs).backward()

    return fwd, fwd_bwd


def measure(fn: Callable, inputs: Dict[str, torch.Tensor], dev: torch.device, reps: int = 5,
            budget_s: float = 2.0, grads_in_forward: bool = False) -> dict:
    """min/median/max of the training forward (autograd recording, output dropped) and of forward+backward,
    and the peak memory beyond the inputs during forward+backward (gradients included), for one row.

    Each phase: warm-up calls (the first compiles) until 0.05 s is spent, then ``reps`` timed calls, fewer
    (at least 3) once ``budget_s`` is spent. On CUDA the peak is read over the timed forward+backward calls
    (each starts by dropping the last gradients, so it is the peak of one step); on the CPU one tracked call.
    ``grads_in_forward``: the forward computes the gradients, so its time is reported in the note only."""
    fwd, fwd_bwd = phases(fn, inputs)
    leaves = _leaves(inputs)
    row = _stats("fwd", time_ms(fwd, dev, warmup=1, reps=reps, budget_s=budget_s, warmup_s=0.05))
    notes = []
    if grads_in_forward:
        notes.append(f"fwd n/a: its forward computes the gradients (forward call {row['fwd_ms']:.3f} ms)")
        row = {k: float("nan") for k in row}
    for t in leaves:
        t.grad = None
    if dev.type == "cuda":
        _free(dev)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    row.update(_stats("fwd_bwd", time_ms(fwd_bwd, dev, warmup=1, reps=reps, budget_s=budget_s, warmup_s=0.05)))
    if dev.type == "cuda":
        torch.cuda.synchronize()
        row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        row["peak_mib"] = peak_extra_bytes(fwd_bwd, dev) / 2**20
    row["_notes"] = notes
    return row
