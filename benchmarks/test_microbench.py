"""pytest-benchmark microbenchmarks: forward+backward of every op on every available backend.

    pytest benchmarks/ --benchmark-only [--benchmark-json out.json]

Sizes fill a GPU when there is one and stay small on the CPU. For tables with baselines, memory and FLOP
floors in one run, use ``python -m fastcontrast bench`` instead.
"""
import pytest
import torch

from fastcontrast.bench import OPS, _DISPATCH_OP, loss_fn, make_inputs
from fastcontrast.dispatch import BACKENDS, unavailable_reason

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N, D = (16384, 768) if DEV.type == "cuda" else (512, 256)
DTYPE = torch.bfloat16 if DEV.type == "cuda" else torch.float32


def _params():
    for op in OPS:
        for b in BACKENDS:
            reason = unavailable_reason(_DISPATCH_OP[op], b, DEV)
            yield pytest.param(op, b, id=f"{op}-{b}", marks=pytest.mark.skipif(reason is not None, reason=str(reason)))


@pytest.mark.parametrize("op,backend", list(_params()))
def test_fwd_bwd(benchmark, op, backend):
    benchmark.group = f"{op} N={N} d={D} {str(DTYPE).replace('torch.', '')}"
    inputs = make_inputs(op, N, D, DEV, DTYPE)
    fn = loss_fn(op, backend)
    leaves = [t for t in inputs.values() if t.requires_grad]

    def step():
        for t in leaves:
            t.grad = None
        fn(**inputs).backward()
        if DEV.type == "cuda":
            torch.cuda.synchronize()

    benchmark(step)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
