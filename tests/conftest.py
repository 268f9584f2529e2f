import os

import torch

# Triton kernels run on the CPU interpreter when there is no GPU. Must be set before triton.jit decorates
# anything, i.e. before fastcontrast is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastcontrast.dispatch import BACKENDS, unavailable_reason  # noqa: E402
from fastcontrast.validate import TOL, compare  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; CI and dev machines are CPU-only")


def kernel_device():
    """Where Triton tests run: CUDA when present, else the CPU under TRITON_INTERPRET=1."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


def backend_param(op: str, backend: str, device=None):
    """A pytest.param for ``backend`` that skips, with the dispatcher's reason, when it cannot run ``op``."""
    device = device or kernel_device()
    reason = unavailable_reason(op, backend, torch.device(device))
    return pytest.param(backend, marks=pytest.mark.skipif(reason is not None, reason=str(reason)), id=backend)


def assert_matches_reference(case, backend, dtype, device, seeds=(0, 1, 2), tol=None):
    """The one comparison every kernel test uses: forward and every gradient vs the float64 reference."""
    tol = tol if tol is not None else TOL[dtype]
    for s in seeds:
        fwd, bwd, grads = compare(case, backend, dtype, torch.device(device), s)
        assert fwd <= tol, f"{case.name}/{backend}/{dtype} seed {s}: forward rel err {fwd:.3e} > {tol:.0e}"
        assert bwd <= tol, f"{case.name}/{backend}/{dtype} seed {s}: backward rel err {bwd:.3e} > {tol:.0e} ({grads})"


@pytest.fixture
def atomics(monkeypatch):
    """Counts the atomic read-modify-writes the Triton interpreter executes (tests of the no-float-atomics rule)."""
    import triton.runtime.interpreter as I

    count = {"n": 0}
    orig = I.InterpreterBuilder.create_atomic_rmw

    def create_atomic_rmw(self, *args, **kw):
        count["n"] += 1
        return orig(self, *args, **kw)

    monkeypatch.setattr(I.InterpreterBuilder, "create_atomic_rmw", create_atomic_rmw)
    return count


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


ALL_BACKENDS = BACKENDS
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# `pytest -m quick tests` (README): a fast, representative subset, chosen by file (under 2 min of the ~16 on
# 2 cores): the public API and CLI, bad inputs, the references against naive formulas and gradcheck, the fused
# kernels of CLIP/InfoNCE (group ids and distillation included), SigLIP and the MM-TS hinge against the reference,
# MM-TS against its official code, the papers' schedules, the open_clip and transformers drop-ins, the README.
QUICK_FILES = (
    "test_api.py", "test_bad_inputs.py", "test_reference_naive.py", "test_reference_gradcheck.py",
    "test_infonce_kernels.py", "test_multi_positive.py", "test_distill.py", "test_siglip.py",
    "test_margin_kernels.py", "test_mmts_official.py", "test_schedules.py", "test_open_clip_parity.py",
    "test_open_clip_upstream_surface.py", "test_transformers_integration.py", "test_readme.py",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in QUICK_FILES:
            item.add_marker(pytest.mark.quick)
