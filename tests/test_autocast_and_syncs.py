"""Every op under torch.autocast (float32 loss, no crash in a kernel) and with no host sync in forward+backward.

Autocast policy (fastcontrast/_amp.py): features are computed in float32 on the CPU and in the autocast dtype
on CUDA; the loss is float32. Host syncs: a TorchDispatchMode (fastcontrast.tools.memtrack.HostSyncs) records every
op that would make the host wait for a GPU (value reads, data-dependent shapes, device-to-host copies); it sees
them on CPU tensors too, and looks inside the custom ops and the C++ kernels they call.
"""
import pytest
import torch

import fastcontrast as fc
from _ops import backend_params
from conftest import HAS_CUDA, kernel_device, requires_cuda
from fastcontrast.tools.memtrack import HostSyncs
from fastcontrast.validate import default_cases, rel_err

CASES = {c.name: c for c in default_cases(n=19, m=19, d=24)}
BACKENDS = ("reference", "dense", "cpu", "triton")


def _params(device=None):
    """Every case on every backend its op has (one that exists but cannot run here skips with the reason)."""
    return [pytest.param(name, p.values[0], marks=p.marks, id=f"{name}-{p.values[0]}") for name, c in CASES.items()
            for p in backend_params(c.op, device or kernel_device(), BACKENDS)]


def _inputs(case, device, dtype, seed=0, grad=True):
    kw = case.make(torch.Generator().manual_seed(seed), torch.device(device), dtype)
    return {k: v.requires_grad_(grad) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in kw.items()}


@pytest.mark.parametrize("name,backend", _params("cpu"))
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_cpu_autocast_gives_the_float32_loss(name, backend, amp_dtype):
    case = CASES[name]
    kw = _inputs(case, "cpu", torch.float32)
    # what a model under autocast hands the loss: the image side in the autocast dtype, the text side in fp32
    first = next(k for k, v in kw.items() if isinstance(v, torch.Tensor) and v.dim() >= 2)
    low = {**kw, first: kw[first].detach().to(amp_dtype).requires_grad_()}
    with torch.autocast("cpu", dtype=amp_dtype):
        loss = case.run(backend, **low)
    assert loss.dtype == torch.float32
    loss.backward()
    assert low[first].grad is not None and low[first].grad.dtype == amp_dtype
    want = case.run(backend, **{**kw, first: low[first].detach().float()})  # policy: fp32 features on the CPU
    assert rel_err(loss, want) <= 1e-6


@requires_cuda
@pytest.mark.parametrize("name,backend", _params("cuda") if HAS_CUDA else [("clip_loss", "triton")])
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_gives_the_float32_loss(name, backend, amp_dtype):
    case = CASES[name]
    kw = _inputs(case, "cuda", torch.float32)
    with torch.autocast("cuda", dtype=amp_dtype):
        loss = case.run(backend, **kw)
    assert loss.dtype == torch.float32
    loss.backward()
    ref = case.run("reference", **_inputs(case, "cuda", torch.float64, grad=False))
    assert rel_err(loss, ref) <= 3e-2


@pytest.mark.parametrize("name,backend", _params())
def test_no_host_sync_in_forward_backward(name, backend):
    case = CASES[name]
    kw = _inputs(case, kernel_device(), torch.float32)
    with HostSyncs() as probe:
        case.run(backend, **kw).backward()
    assert probe.syncs == [], probe.syncs


def test_modules_issue_no_host_sync():
    x, y = torch.randn(12, 16, requires_grad=True), torch.randn(12, 16, requires_grad=True)
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-5.0, requires_grad=True)
    with HostSyncs() as probe:
        fc.ClipLoss()(x, y, scale).backward()
        fc.SigLipLoss()(x, y, scale, bias).backward()
        fc.ObliqueClipLoss(learn_scale=True)(x.view(12, 2, 8), y.view(12, 2, 8)).backward()
    assert probe.syncs == [], probe.syncs


def test_the_probe_sees_syncs_and_debug_mode_makes_them():
    x, y = torch.randn(6, 8), torch.randn(6, 8)
    with HostSyncs() as probe:
        float(x.sum())
    assert probe.syncs == ["aten::_local_scalar_dense"]
    with fc.debug(), HostSyncs() as probe:
        fc.clip_loss(x, y, torch.tensor(10.0))
    assert probe.syncs  # the value checks are host reads: that is why they are opt-in


def test_non_finite_inputs_raise_in_debug_mode_and_propagate_otherwise():
    x, y = torch.randn(6, 8), torch.randn(6, 8)
    x[2, 3] = float("nan")
    assert not fc.debug_enabled()
    assert torch.isnan(fc.clip_loss(x, y, 10.0))  # as F.cross_entropy would: NaN in, NaN out
    with fc.debug():
        with pytest.raises(ValueError, match="image_features contains non-finite"):
            fc.clip_loss(x, y, 10.0)
        with pytest.raises(ValueError, match="logit_scale must be > 0"):
            fc.clip_loss(y, y, torch.tensor(-1.0))
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\)"):
            fc.clip_loss(y, y, 10.0, labels=torch.tensor([0, 1, 2, 3, 4, 6]))
    assert not fc.debug_enabled()


def test_debug_environment_variable():
    import subprocess
    import sys

    code = ("import torch, fastcontrast as fc; x = torch.randn(4, 8); x[0, 0] = float('nan')\n"
            "try:\n    fc.clip_loss(x, x, 10.0); print('propagated')\nexcept ValueError as e:\n    print('raised')")
    for env, want in (("1", "raised"), ("0", "propagated")):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**__import__("os").environ, "FASTCONTRAST_DEBUG": env})
        assert r.stdout.strip().splitlines()[-1] == want, r.stderr[-2000:]


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda", "reference"])
def test_cuda_graph_captures_a_training_step(backend):
    """One loss forward+backward captured into a CUDA graph replays with the eager results (no host sync inside)."""
    from fastcontrast.dispatch import unavailable_reason

    if unavailable_reason("infonce", backend, torch.device("cuda")) is not None:
        pytest.skip(unavailable_reason("infonce", backend, torch.device("cuda")))
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(512, 128, device="cuda", generator=g).requires_grad_()
    y = torch.randn(512, 128, device="cuda", generator=g).requires_grad_()
    scale = torch.tensor(10.0, device="cuda", requires_grad=True)

    def step():
        for t in (x, y, scale):
            t.grad = None
        loss = fc.clip_loss(x, y, scale, normalize=True, backend=backend)
        loss.backward()
        return loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up: Triton compiles, caches fill
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    with torch.no_grad():
        x.copy_(torch.randn(512, 128, device="cuda", generator=g))
    graph.replay()
    torch.cuda.synchronize()
    want_x = x.detach().clone().requires_grad_()
    want = fc.clip_loss(want_x, y.detach(), scale.detach(), normalize=True, backend=backend)
    want.backward()
    assert torch.allclose(static_loss, want, rtol=1e-4)
    assert torch.allclose(x.grad, want_x.grad, rtol=1e-3, atol=1e-6)
