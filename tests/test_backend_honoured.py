"""The backend a user names is the backend that runs, on every path (issue 26 point 1): one process, open_clip's
gathers, the CLIP ring, the SigLIP modes, MM-TS's gathers, distillation and the distributed Sinkhorn.

What runs is observed, not inferred: a TorchDispatchMode records every ``fastcontrast::`` custom op with the
kernel it was told to run (the dispatcher's ``Impl.kernel``), and the Triton interpreter's launcher records every
Triton kernel launched. ``backend="reference"`` must run neither; ``"cpu"`` only the C++ kernels of csrc/ (each
recorded op's kernel argument "cpu", no Triton launch); ``"triton"`` Triton kernels (and "triton" in each
recorded op). Forward and backward both.
"""
import contextlib
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastcontrast as fc
from _gloo import run_ranks
from fastcontrast.dispatch import unavailable_reason

# the position of the kernel argument(s) in each fused op's schema
KERNEL_ARGS = {"lse_pair": (7, 8), "lse_pair_backward": (11,), "soft_ce_rows": (4,), "soft_ce_rows_backward": (6,),
               "teacher_weighted_keys": (), "teacher_weighted_keys_backward": ()}


class _Ops(TorchDispatchMode):
    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns, name = func._schema.name.split("::")
        if ns == "fastcontrast":
            self.seen.append((name, tuple(args[i] for i in KERNEL_ARGS[name])))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def recorded():
    """(fused ops [(name, kernel args)], Triton kernels launched [name])."""
    import triton.runtime.interpreter as I

    ops, launches = [], []
    orig = I.InterpretedFunction.run

    def run(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        return orig(self, *args, **kwargs)

    I.InterpretedFunction.run = run
    try:
        with _Ops(ops):
            yield ops, launches
    finally:
        I.InterpretedFunction.run = orig


def verdict(backend, ops, launches):
    """None when what ran is what ``backend`` names, else a sentence saying what ran instead."""
    kernels = {k for _, ks in ops for k in ks}
    if backend == "reference":
        return None if not ops and not launches else f"ran {sorted({n for n, _ in ops})} / {sorted(set(launches))}"
    if backend == "cpu":
        if launches or kernels - {"cpu"} or not ops:
            return f"cpu backend ran ops {ops[:4]} and Triton kernels {sorted(set(launches))}"
        return None
    if not launches or kernels - {"triton"}:
        return f"triton backend ran ops {ops[:4]} and Triton kernels {sorted(set(launches))}"
    return None


def _features(rank, n=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed + 17 * rank)
    return (torch.randn(n, d, generator=g).requires_grad_(), torch.randn(n, d, generator=g).requires_grad_())


def _paths(rank, world, backend):
    """name -> a callable running one forward + backward of that path with ``backend``."""
    n = 12
    ids = torch.arange(n) // 3 + 100 * rank  # groups of 3 positives per rank
    tau = torch.full((n,), 0.1)
    cl = fc.ClipLoss
    paths = {
        "clip ring": lambda x, y: cl(rank=rank, world_size=world, mode="ring", backend=backend)(x, y, 10.0),
        "clip ring ids": lambda x, y: cl(rank=rank, world_size=world, mode="ring", backend=backend)(
            x, y, 10.0, image_ids=ids, text_ids=ids),
        "clip gather": lambda x, y: cl(rank=rank, world_size=world, gather_with_grad=True, backend=backend)(
            x, y, 10.0),
        "clip gather local": lambda x, y: cl(rank=rank, world_size=world, local_loss=True, gather_with_grad=True,
                                             backend=backend)(x, y, 10.0),
        "clip gather local ids": lambda x, y: cl(rank=rank, world_size=world, local_loss=True, backend=backend)(
            x, y, 10.0, image_ids=ids, text_ids=ids),
        "distill gather local": lambda x, y: fc.DistillClipLoss(rank=rank, world_size=world, local_loss=True,
                                                                backend=backend)(
            x, y, 10.0, x.detach() + 1, y.detach() - 1, 5.0)[0],
        "mmts clip": lambda x, y: fc.MMTSClipLoss(rank=rank, world_size=world, backend=backend)(x, y, tau=tau),
        "mmts clip local": lambda x, y: fc.MMTSClipLoss(rank=rank, world_size=world, local_loss=True,
                                                        backend=backend)(x, y, tau=tau),
        "codebook global sinkhorn": lambda x, y: fc.codebook_loss(x, y, x.detach(), y.detach(), torch.randn(5, 8),
                                                                  backend=backend),
    }
    if backend != "cpu":  # SigLIP and the hinge have no C++ kernels (the dispatcher refuses: tested below)
        for impl in ("bidir", "shift", "reduce", "gather"):
            paths[f"siglip {impl}"] = (lambda impl: lambda x, y: fc.SigLipLoss(
                rank=rank, world_size=world, dist_impl=impl, backend=backend)(x, y, 10.0, -2.0))(impl)
        paths["mmts max margin"] = lambda x, y: fc.MMTSMaxMarginLoss(rank=rank, world_size=world,
                                                                     backend=backend)(x, y, tau=tau)
    return paths


def _distributed_cases(rank, world):
    os.environ["TRITON_INTERPRET"] = "1"  # the kernels were decorated under the interpreter (inherited env)
    out = {}
    for backend in ("reference", "cpu", "triton"):
        if unavailable_reason("infonce", backend, torch.device("cpu")) is not None:
            out[backend] = None
            continue
        for name, run in _paths(rank, world, backend).items():
            x, y = _features(rank)
            with recorded() as (ops, launches):
                run(x, y).backward()
            out[(backend, name)] = verdict(backend, ops, launches)
    return out


_RESULTS = {}


def _results():
    if "r" not in _RESULTS:
        _RESULTS["r"] = run_ranks(_distributed_cases, 2)
    return _RESULTS["r"]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_every_distributed_path_runs_the_named_backend(backend):
    res = _results()
    if res[0].get(backend, 0) is None:
        pytest.skip(f"backend {backend!r} cannot run here: "
                    f"{unavailable_reason('infonce', backend, torch.device('cpu'))}")
    wrong = {f"rank {r} {name}": v for r, out in enumerate(res) for (b, name), v in
             ((k, v) for k, v in out.items() if isinstance(k, tuple)) if b == backend and v is not None}
    checked = [k for k in res[0] if isinstance(k, tuple) and k[0] == backend]
    assert len(checked) >= 9, checked
    assert not wrong, wrong


SINGLE = {
    "clip_loss": lambda x, y, b: fc.clip_loss(x, y, 10.0, backend=b),
    "clip_loss ids": lambda x, y, b: fc.clip_loss(x, y, 10.0, backend=b, image_ids=torch.arange(12) // 2,
                                                  text_ids=torch.arange(12) // 2),
    "oblique_clip_loss": lambda x, y, b: fc.oblique_clip_loss(x.view(12, 2, 4), y.view(12, 2, 4), backend=b),
    "adaptive_temperature_clip_loss": lambda x, y, b: fc.adaptive_temperature_clip_loss(x, y, torch.full((12,), .1),
                                                                                        backend=b),
    "momentum_contrastive_loss": lambda x, y, b: fc.momentum_contrastive_loss(x, y.detach(), x.detach(), backend=b),
    "codebook_loss": lambda x, y, b: fc.codebook_loss(x, y, x.detach(), y.detach(), torch.randn(5, 8), backend=b),
    "distill_clip_loss": lambda x, y, b: fc.distill_clip_loss(x, y, 10.0, x.detach(), y.detach(), 5.0,
                                                              backend=b)[1],
    "siglip_loss": lambda x, y, b: fc.siglip_loss(x, y, 10.0, -2.0, backend=b),
    "max_margin_loss": lambda x, y, b: fc.max_margin_loss(x, y, backend=b),
}
_OP = {"siglip_loss": "siglip", "max_margin_loss": "max_margin", "codebook_loss": "swapped_prediction",
       "momentum_contrastive_loss": "momentum_contrastive", "distill_clip_loss": "distill"}


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("loss", sorted(SINGLE))
def test_every_public_loss_runs_the_named_backend(loss, backend):
    reason = unavailable_reason(_OP.get(loss, "infonce"), backend, torch.device("cpu"))
    x, y = _features(0)
    if reason is not None:  # refused with the reason, never silently run on another backend
        with pytest.raises(fc.BackendUnavailableError, match=f"backend '{backend}' is unavailable"):
            SINGLE[loss](x, y, backend)
        return
    with recorded() as (ops, launches):
        SINGLE[loss](x, y, backend).backward()
    assert verdict(backend, ops, launches) is None, verdict(backend, ops, launches)
