"""Numerics check of every available backend against the float64 reference, on fresh random inputs.

``python -m fastcontrast validate`` prints: op, backend, dtype, forward and backward max relative error, pass/fail.
The cases here are also what the test-suite's shared comparison helper uses.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional

import torch

from .dispatch import BACKENDS, unavailable_reason

# Relative-error tolerances by working dtype (fp32 kernels may use tf32 dots on GPU: 1e-3 there).
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@dataclasses.dataclass
class Case:
    name: str
    op: str  # the dispatcher's op name: decides which backends apply
    make: Callable[[torch.Generator, torch.device, torch.dtype], Dict[str, torch.Tensor]]
    run: Callable[..., torch.Tensor]
    differentiable: bool = True


def default_cases(n: int = 37, m: int = 53, d: int = 40, k: int = 3) -> List[Case]:
    """One case per op of the op list (:data:`fastcontrast.oplist.OPS`), at ragged sizes on purpose: N, M not
    multiples of any tile, N != M (ops that pair i with i use N rows on both sides)."""
    from .oplist import OPS

    def case(op):
        return Case(op.name, op.dispatch, lambda g, dev, dt: op.make(g, dev, dt, n, m, d, k),
                    lambda backend, **kw: op(backend, **kw), op.differentiable)

    return [case(op) for op in OPS]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64; NaN/inf anywhere gives inf (NaN never passes)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    den = b.norm()
    return float((a - b).norm() / den) if den > 0 else float((a - b).norm())


def compare(case: Case, backend: str, dtype: torch.dtype, device: torch.device, seed: int):
    """Run ``case`` on ``backend`` in ``dtype`` and the reference in float64 on the same inputs.

    Returns (forward rel err, max backward rel err over differentiable inputs, names of grads compared).
    """
    g = torch.Generator().manual_seed(seed)
    inputs = case.make(g, device, dtype)
    leaves = {k: v.detach().clone().requires_grad_(case.differentiable and v.is_floating_point())
              for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    ref_leaves = {k: v.detach().double().requires_grad_(v.requires_grad) if v.is_floating_point() else v
                  for k, v in leaves.items()}
    kw = {k: leaves.get(k, v) for k, v in inputs.items()}
    rkw = {k: ref_leaves.get(k, v) for k, v in inputs.items()}
    out = case.run(backend, **kw)
    ref = case.run("reference", **rkw)
    fwd = rel_err(out, ref)
    if not case.differentiable:
        return fwd, 0.0, []
    grad_names = [k for k, v in leaves.items() if v.requires_grad]
    gs = torch.autograd.grad(out, [leaves[k] for k in grad_names], allow_unused=True)
    rgs = torch.autograd.grad(ref, [ref_leaves[k] for k in grad_names], allow_unused=True)
    bwd = 0.0
    for name, a, b in zip(grad_names, gs, rgs):
        if b is None:
            continue
        if a is None:
            raise AssertionError(f"{case.name}/{backend}: no gradient for {name}")
        bwd = max(bwd, rel_err(a, b))
    return fwd, bwd, grad_names


_STREAM_WIDTHS = (24, 10, 6, 9, 11, 11, 5, 10)


def _stream_row(r) -> str:
    return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, _STREAM_WIDTHS)) + " |"


def run_validation(devices=None, dtypes=None, seeds=(0, 1, 2), cases: Optional[List[Case]] = None, out=print,
                   stream: bool = False, backends=None):
    """Every case × backend × dtype against the float64 reference; returns (all passed, rows). ``stream``: each
    row is printed (and flushed) the moment it is computed, in fixed-width columns, instead of one aligned
    table at the end, so a run stopped early keeps its rows. ``backends``: only these (default: all)."""
    import sys

    devices = devices or (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]
    dtypes = dtypes or [torch.float32, torch.bfloat16]
    cases = cases or default_cases()
    header = ("op", "backend", "device", "dtype", "fwd rel err", "bwd rel err", "tol", "result")
    if stream:
        out(_stream_row(header))
        out("|" + "|".join("-" * (w + 2) for w in _STREAM_WIDTHS) + "|")
        sys.stdout.flush()
    rows, ok_all = [], True

    def emit(r):
        rows.append(r)
        if stream:
            out(_stream_row(r))
            sys.stdout.flush()

    for dev in map(torch.device, devices):
        for case in cases:
            for backend in backends or BACKENDS:
                reason = unavailable_reason(case.op, backend, dev)
                if reason is not None:  # listed, not hidden: the table says what was not run and why
                    emit((case.name, backend, str(dev), "-", "-", "-", "-", f"skipped: {reason}"))
                    continue
                for dt in dtypes:
                    tol = TOL[dt]
                    fwd = bwd = 0.0
                    err = None
                    try:
                        for s in seeds:
                            f, b, _ = compare(case, backend, dt, dev, s)
                            fwd, bwd = max(fwd, f), max(bwd, b)
                    except Exception as e:  # noqa: BLE001 - reported as a failing row
                        err = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
                    ok = err is None and fwd <= tol and bwd <= tol
                    ok_all &= ok
                    emit((case.name, backend, str(dev), str(dt).replace("torch.", ""),
                          f"{fwd:.2e}", f"{bwd:.2e}", f"{tol:.0e}", "pass" if ok else f"FAIL {err or ''}"))
    if not stream:
        widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
        line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
        out(line(header))
        out("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for r in rows:
            out(line(r))
    ran = sum(1 for r in rows if not r[-1].startswith("skipped"))
    out(f"\n{'all passed' if ok_all else 'SOME FAILED'}: {ran} rows run, {len(rows) - ran} skipped, seeds {list(seeds)}, "
        "errors are ‖out − ref‖/‖ref‖ against the float64 reference on the same inputs")
    return ok_all, rows


def main(argv=None) -> int:
    """``python -m fastcontrast.validate``: the validation with each row printed as it is computed."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m fastcontrast.validate", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", action="append", help="cpu / cuda (repeatable; default: cuda if present, and cpu)")
    p.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--backend", action="append", choices=list(BACKENDS), help="only these backends (repeatable)")
    p.add_argument("--size", default=None, help="n,m,d,k of the cases (default: the ragged 37,53,40,3)")
    a = p.parse_args(argv)
    cases = default_cases(*[int(v) for v in a.size.split(",")]) if a.size else None
    ok, _ = run_validation(devices=a.device, dtypes=[getattr(torch, d) for d in (a.dtype or ["float32", "bfloat16"])],
                           seeds=tuple(range(a.seeds)), cases=cases, stream=True, backends=a.backend)
    return 0 if ok else 1


if __name__ == "__main__":
    import sys

    sys.exit(main())
