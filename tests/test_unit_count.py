"""How many GEMM units of 2·N·M·D one forward+backward executes: 4 for the InfoNCE family on Triton (one sweep of
S for both directions' statistics, one recompute, two gradient GEMMs); 3 for SigLIP and the diagonal hinge (the
sweep writes G, two GEMMs behind it), 1 for the hardest-negative hinge (gathers), 1 for any forward without grad. Counted on the CPU: every ``tl.dot`` the
Triton interpreter executes, plus every ATen matrix product (the slab GEMMs), inside the custom ops too."""
import pytest
import torch

import fastcontrast as fc
from conftest import INTERPRET, backend_param
from fastcontrast.tools.memtrack import MatmulFlops

pytestmark = pytest.mark.skipif(not INTERPRET or torch.cuda.is_available(),
                                reason="counts tl.dot inside the Triton interpreter (CPU-only runs)")


@pytest.fixture
def dot_flops(monkeypatch):
    import triton.runtime.interpreter as I

    count = {"flops": 0}
    orig = I.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, *rest):
        m, k = a.data.shape[-2:]
        count["flops"] += 2 * m * k * b.data.shape[-1]
        return orig(self, a, b, d, *rest)

    monkeypatch.setattr(I.InterpreterBuilder, "create_dot", create_dot)
    return count


def _units(loss_fn, n, m, d, dot_flops):
    with MatmulFlops() as mm:
        loss_fn().backward()
    return (dot_flops["flops"] + mm.flops) / (2 * n * m * d), dot_flops["flops"] / (2 * n * m * d)


N, M, D = 64, 96, 64  # multiples of the interpreter's 32-wide tiles: no padding in the count


@pytest.mark.parametrize("backend", [backend_param("infonce", "triton")])
@pytest.mark.parametrize("case", ["clip", "clip_normalized", "labels", "oblique", "per_sample_tau"])
def test_infonce_forward_backward_executes_four_units(backend, case, dot_flops):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g).requires_grad_()
    y = torch.randn(M, D, generator=g).requires_grad_()
    labels = torch.randint(0, M, (N,), generator=g)
    s = torch.tensor(10.0, requires_grad=True)
    fns = {
        "clip": lambda: fc.clip_loss(x, y, s, labels=labels, backend=backend),
        "clip_normalized": lambda: fc.clip_loss(x, y, s, labels=labels, normalize=True, backend=backend),
        "labels": lambda: fc.clip_loss(x, y, s, labels=labels, logit_bias=-1.0, backend=backend),
        "oblique": lambda: fc.oblique_clip_loss(x.view(N, 2, D // 2), y.view(M, 2, D // 2), labels=labels,
                                                backend=backend),
        "per_sample_tau": lambda: fc.adaptive_temperature_clip_loss(
            x, y, 0.05 + torch.rand(N, generator=g), 0.05 + torch.rand(M, generator=g), labels=labels,
            normalize=True, backend=backend),
    }
    total, in_kernels = _units(fns[case], N, M, D, dot_flops)
    assert total == pytest.approx(4.0), (total, in_kernels)  # 1 sweep + 1 recompute (Triton) + 2 GEMMs (ATen)
    assert in_kernels == pytest.approx(2.0)


def _sig_inputs(n, m, d):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g).requires_grad_()
    y = torch.randn(m, d, generator=g).requires_grad_()
    return x, y, torch.tensor(3.0, requires_grad=True), torch.tensor(-2.0, requires_grad=True)


@pytest.mark.parametrize("backend", [backend_param("siglip", "triton")])
def test_siglip_executes_three_units_and_one_without_grad(backend, dot_flops):
    x, y, s, b = _sig_inputs(N, M, D)
    labels = torch.randint(0, M, (N,), generator=torch.Generator().manual_seed(2))
    total, in_kernels = _units(lambda: fc.siglip_loss(x, y, s, b, labels=labels, backend=backend), N, M, D,
                               dot_flops)
    assert total == pytest.approx(3.0), (total, in_kernels)  # 1 fused sweep (Triton) + 2 slab GEMMs (ATen)
    assert in_kernels == pytest.approx(1.0)
    dot_flops["flops"] = 0
    with torch.no_grad(), MatmulFlops() as mm:
        fc.siglip_loss(x, y, s, b, labels=labels, backend=backend)
    assert (dot_flops["flops"] + mm.flops) / (2 * N * M * D) == pytest.approx(1.0)


@pytest.mark.parametrize("backend", [backend_param("max_margin", "triton")])
def test_margin_diagonal_executes_three_units(backend, dot_flops):
    x, y, _, _ = _sig_inputs(N, N, D)
    total, in_kernels = _units(lambda: fc.max_margin_loss(x, y, 0.3, backend=backend), N, N, D, dot_flops)
    assert total == pytest.approx(3.0), (total, in_kernels)  # was 4: fwd sweep + recompute + 2 GEMMs
    assert in_kernels == pytest.approx(1.0)
    dot_flops["flops"] = 0
    with torch.no_grad(), MatmulFlops() as mm:
        fc.max_margin_loss(x, y, 0.3, backend=backend)
    assert (dot_flops["flops"] + mm.flops) / (2 * N * N * D) == pytest.approx(1.0)


@pytest.mark.parametrize("labelled", [False, True])
@pytest.mark.parametrize("backend", [backend_param("max_margin", "triton")])
def test_margin_hardest_executes_one_unit(backend, labelled, dot_flops):
    m = M if labelled else N
    x, y, _, _ = _sig_inputs(N, m, D)
    labels = torch.randint(0, m, (N,), generator=torch.Generator().manual_seed(3)) if labelled else None
    total, in_kernels = _units(lambda: fc.max_margin_loss(x, y, 0.3, labels=labels, hardest=True, backend=backend),
                               N, m, D, dot_flops)
    assert total == pytest.approx(1.0), (total, in_kernels)  # one sweep; the gradient is gathers, no GEMM
    assert in_kernels == pytest.approx(1.0)
