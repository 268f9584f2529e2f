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


# ------------------------------------------------------------------------------- fused Matryoshka (issue 27, point 3)
MD = 256
MDIMS = (MD, MD // 2, MD // 4, MD // 8, MD // 16)  # the five sizes of the goal: d, d/2, d/4, d/8, d/16
MWEIGHTS = (1.0, 0.5, 2.0, 0.25, 1.5)


def _m_inputs(kind):
    g = torch.Generator().manual_seed(4)
    m = M if kind == "ce_rows" else N
    x = torch.randn(N, MD, generator=g, dtype=torch.float64)
    y = torch.randn(m, MD, generator=g, dtype=torch.float64)
    return x, y, torch.tensor(6.0, dtype=torch.float64), torch.randint(0, m, (N,), generator=g)


def _tiles_units(fn, n, m):
    """GEMM units of one forward + backward of ``fn(x, y)`` (fresh leaves), with its loss."""
    with MatmulFlops() as mm:
        loss = fn()
        loss.backward()
    return mm.flops / (2 * n * m * MD), loss


def _single(kind, x, y, s, labels, d):
    """fastcontrast's own loss at prefix d on the tiles path (the PyTorch form of the fused kernels)."""
    from fastcontrast.dispatch import kernel_impl

    xd, yd = (t[:, :d].detach().clone().requires_grad_() for t in (x, y))
    if kind == "ce_rows":
        nx, ny = torch.nn.functional.normalize(xd, dim=-1), torch.nn.functional.normalize(yd, dim=-1)
        return lambda: kernel_impl("ce_rows", "tiles")(nx, ny, s, None, labels)
    n, m = xd.shape[0], yd.shape[0]
    return lambda: kernel_impl("infonce", "tiles")(xd, yd, s.expand(n), s.expand(m), None, labels, True, 1)


@pytest.mark.parametrize("kind", ["ce_rows", "clip"])
def test_matryoshka_tiles_cost_one_loss_and_equal_the_separate_losses(kind):
    """The tiles path (what the Triton kernels do, in PyTorch): the fused Matryoshka at dims (d, d/2, d/4, d/8, d/16)
    executes 4 units (one sweep with checkpoints, one recompute, the band GEMMs once over d), the full-size loss 4,
    the five separate losses 4·(1 + 1/2 + 1/4 + 1/8 + 1/16) = 7.75 (1.94×); goal ≤ 1.25×. And it is their weighted
    sum, float64 to 1e-10."""
    from fastcontrast.dispatch import kernel_impl

    x, y, s, labels = _m_inputs(kind)
    n, m = x.shape[0], y.shape[0]
    op = "matryoshka_ce_rows" if kind == "ce_rows" else "matryoshka_clip"
    xl, yl = x.clone().requires_grad_(), y.clone().requires_grad_()
    fused, loss = _tiles_units(lambda: kernel_impl(op, "tiles")(xl, yl, s, labels, MDIMS,
                                                                torch.tensor(MWEIGHTS, dtype=torch.float64), True),
                               n, m)
    full, _ = _tiles_units(_single(kind, x, y, s, labels, MD), n, m)
    separate, want = 0.0, 0.0
    for d, w in zip(MDIMS, MWEIGHTS):
        units, one = _tiles_units(_single(kind, x, y, s, labels, d), n, m)
        separate, want = separate + units, want + w * float(one.detach())
    assert full == pytest.approx(4.0) and fused == pytest.approx(4.0), (full, fused)
    assert separate / full == pytest.approx(1.9375)
    assert fused / full <= 1.25
    assert abs(float(loss) - want) <= 1e-10 * abs(want), (float(loss), want)


@pytest.mark.parametrize("kind", ["ce_rows", "clip"])
def test_matryoshka_triton_units(kind, dot_flops):
    """The Triton kernels: the forward sweep and the backward's recompute each run every band's K-chunks (a band
    narrower than the interpreter's 32-wide K-chunk costs a whole chunk: 9 chunks for 8 here, none
    extra at the GPU's K-chunks of 32/64 for dims that are multiples of them), plus the band GEMMs (2 units)."""
    x, y, s, labels = _m_inputs(kind)
    xf, yf = x.float().requires_grad_(), y.float().requires_grad_()
    fn = fc.matryoshka_ce_rows if kind == "ce_rows" else fc.matryoshka_clip_loss
    call = (lambda: fn(xf, yf, s.float(), labels=labels, dims=MDIMS, weights=MWEIGHTS, backend="triton"))
    total, in_kernels = _units(call, N, yf.shape[0], MD, dot_flops)
    chunks = 9 / 8  # the bands 16, 16, 32, 64, 128 wide in chunks of 32
    assert in_kernels == pytest.approx(2 * chunks), (total, in_kernels)
    assert total == pytest.approx(2 * chunks + 2.0), (total, in_kernels)
    assert total / 4.0 <= 1.25
