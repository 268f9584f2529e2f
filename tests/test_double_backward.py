"""Double backward (issue 20, point 2): every public loss on every backend either computes exact second derivatives
(``gradgradcheck`` in float64: the reference, the dense path, and "auto" at the small sizes where it takes them) or
raises a RuntimeError naming fastcontrast, the op and the backend when asked for a differentiable gradient
(``create_graph=True``): never a silently wrong gradient of a gradient. The first-order backward of the dense path
never pays for this (no recompute through the reference), eager or under torch.compile.
"""
import pytest
import torch
from torch.autograd import gradgradcheck

import fastcontrast.functional as Fn
from conftest import HAS_CUDA, kernel_device
from _ops import dispatch_of, existing_backends, uncovered
from fastcontrast import oplist
from fastcontrast.dispatch import unavailable_reason

N, M, D = 4, 5, 4  # tiny: gradgradcheck perturbs every input element
EXACT = ("reference", "dense", "auto")  # "auto" takes dense/reference at these sizes (below the crossover)


def _r(g, *shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _ids(*vals, device):
    return torch.tensor(vals, device=device)


# name -> (dispatcher op, make(g, dtype, device) -> (loss(backend, *inputs), differentiable inputs)).
# Ragged N != M with labels, group ids with repeats, K tokens, per-sample temperatures, tensor scales and biases:
# every argument that can carry a gradient carries one.
def _clip(g, dt, dev):
    x, y, s = _r(g, N, D, dtype=dt, device=dev), _r(g, N, D, dtype=dt, device=dev), torch.tensor(2.0, dtype=dt)
    return (lambda be, x, y, s: Fn.clip_loss(x, y, s, backend=be)), (x, y, s.to(dev))


def _clip_labels(g, dt, dev):
    x, y = _r(g, N, D, dtype=dt, device=dev), _r(g, M, D, dtype=dt, device=dev)
    s, b = torch.tensor(3.0, dtype=dt, device=dev), torch.tensor(-0.5, dtype=dt, device=dev)
    lab = _ids(0, 3, 4, 3, device=dev)
    return (lambda be, x, y, s, b: Fn.clip_loss(x, y, s, b, labels=lab, normalize=True, backend=be)), (x, y, s, b)


def _clip_ids(g, dt, dev):
    x, y, s = _r(g, N, D, dtype=dt, device=dev), _r(g, M, D, dtype=dt, device=dev), torch.tensor(2.0, dtype=dt)
    ii, ti = _ids(0, 1, 1, 2, device=dev), _ids(1, 0, 2, 1, 3, device=dev)
    return (lambda be, x, y, s: Fn.clip_loss(x, y, s, image_ids=ii, text_ids=ti, backend=be)), (x, y, s.to(dev))


def _oblique(g, dt, dev):
    x, y = _r(g, N, 2, 2, dtype=dt, device=dev), _r(g, N, 2, 2, dtype=dt, device=dev)
    return (lambda be, x, y, s: Fn.oblique_clip_loss(x, y, s, backend=be)), (x, y, torch.tensor(1.5, dtype=dt,
                                                                                                  device=dev))


def _adaptive(g, dt, dev):
    x, y = _r(g, N, D, dtype=dt, device=dev), _r(g, M, D, dtype=dt, device=dev)
    ti = (0.3 + torch.rand(N, generator=g, dtype=torch.float64)).to(dev, dt)
    tt = (0.3 + torch.rand(M, generator=g, dtype=torch.float64)).to(dev, dt)
    lab = _ids(1, 0, 4, 2, device=dev)
    return (lambda be, x, y, ti, tt: Fn.adaptive_temperature_clip_loss(x, y, ti, tt, labels=lab, normalize=True,
                                                                       backend=be)), (x, y, ti, tt)


def _siglip(g, dt, dev):
    x, y = _r(g, N, D, dtype=dt, device=dev), _r(g, N, D, dtype=dt, device=dev)
    s, b = torch.tensor(2.0, dtype=dt, device=dev), torch.tensor(-1.0, dtype=dt, device=dev)
    return (lambda be, x, y, s, b: Fn.siglip_loss(x, y, s, b, backend=be)), (x, y, s, b)


def _siglip_labels(g, dt, dev):
    x, y = _r(g, N, D, dtype=dt, device=dev), _r(g, M, D, dtype=dt, device=dev)
    s, b = torch.tensor(2.0, dtype=dt, device=dev), torch.tensor(-1.0, dtype=dt, device=dev)
    lab = _ids(2, 0, 4, 0, device=dev)
    return (lambda be, x, y, s, b: Fn.siglip_loss(x, y, s, b, labels=lab, backend=be)), (x, y, s, b)


def _siglip_negative_only(g, dt, dev):
    x, y, s = _r(g, N, D, dtype=dt, device=dev), _r(g, M, D, dtype=dt, device=dev), torch.tensor(2.0, dtype=dt)
    return (lambda be, x, y, s: Fn.siglip_loss(x, y, s, -1.0, negative_only=True, backend=be)), (x, y, s.to(dev))


def _siglip_plus(g, dt, dev):
    x, y = _r(g, N, D, dtype=dt, device=dev), _r(g, M, D, dtype=dt, device=dev)
    s, b = torch.tensor(2.0, dtype=dt, device=dev), torch.tensor(-1.0, dtype=dt, device=dev)
    ii, ti = _ids(0, 1, 1, 2, device=dev), _ids(1, 0, 2, 1, 3, device=dev)
    return (lambda be, x, y, s, b: Fn.siglip_loss(x, y, s, b, image_ids=ii, text_ids=ti, weighting="inverse_count",
                                                  backend=be)), (x, y, s, b)


def _ce_rows(g, dt, dev):
    a, b = _r(g, N, D, dtype=dt, device=dev), _r(g, M, D, dtype=dt, device=dev)
    s, bias = torch.tensor(2.0, dtype=dt, device=dev), torch.tensor(0.5, dtype=dt, device=dev)
    lab = _ids(4, 1, 1, 0, device=dev)
    return (lambda be, a, b, s, bias: Fn.ce_rows(a, b, s, bias, labels=lab, backend=be)), (a, b, s, bias)


def _margin(g, dt, dev):
    x, y = _r(g, N, D, dtype=dt, device=dev), _r(g, N, D, dtype=dt, device=dev)
    margin = torch.tensor([0.2, 0.3, 0.1, 0.25], dtype=dt, device=dev)
    return (lambda be, x, y: Fn.max_margin_loss(x, y, margin, backend=be)), (x, y)


def _margin_labels(g, dt, dev):
    x, y = _r(g, N, D, dtype=dt, device=dev), _r(g, M, D, dtype=dt, device=dev)
    lab = _ids(3, 0, 1, 3, device=dev)
    return (lambda be, x, y: Fn.max_margin_loss(x, y, 0.3, labels=lab, reduction="sum", backend=be)), (x, y)


def _margin_hardest(g, dt, dev):
    x, y = _r(g, N, D, dtype=dt, device=dev), _r(g, M, D, dtype=dt, device=dev)
    lab = _ids(1, 4, 0, 2, device=dev)
    return (lambda be, x, y: Fn.max_margin_loss(x, y, 0.5, labels=lab, hardest=True, backend=be)), (x, y)


def _codebook(g, dt, dev):
    x, y, c = (_r(g, N, D, dtype=dt, device=dev), _r(g, N, D, dtype=dt, device=dev),
               _r(g, 3, D, dtype=dt, device=dev))
    tx, ty = _r(g, N, D, dtype=dt, device=dev), _r(g, N, D, dtype=dt, device=dev)
    # the codebook stays fixed: the Sinkhorn targets see it through a stop-gradient (SwAV), which a finite
    # difference would not respect; its gradient path through the student softmax is the features' mirror image
    return (lambda be, x, y: Fn.codebook_loss(x, y, tx, ty, c, tau=0.5, epsilon=0.3, backend=be)), (x, y)


def _momentum(g, dt, dev):
    q, k, tq, qu = (_r(g, N, D, dtype=dt, device=dev) for _ in range(4))
    # the scale stays fixed: the teacher's soft targets see it through a stop-gradient (ALBEF)
    return (lambda be, q: Fn.momentum_contrastive_loss(q, k, tq, qu, 3.0, alpha=0.4, backend=be)), (q,)


def _distill(g, dt, dev):
    x, y = _r(g, N, D, dtype=dt, device=dev), _r(g, N, D, dtype=dt, device=dev)
    tx, ty = _r(g, N, 3, dtype=dt, device=dev), _r(g, N, 3, dtype=dt, device=dev)

    def loss(be, x, y, s):
        contrastive, distill = Fn.distill_clip_loss(x, y, s, tx, ty, 2.0, backend=be)
        return contrastive + 0.7 * distill

    return loss, (x, y, torch.tensor(1.5, dtype=dt, device=dev))


def _matryoshka_ce_rows(g, dt, dev):
    q, k = _r(g, N, D, dtype=dt, device=dev), _r(g, M, D, dtype=dt, device=dev)
    s, w = torch.tensor(2.0, dtype=dt, device=dev), torch.tensor([1.0, 0.5, 2.0], dtype=dt, device=dev)
    lab = _ids(4, 1, 1, 0, device=dev)
    return (lambda be, q, k, s, w: Fn.matryoshka_ce_rows(q, k, s, labels=lab, dims=(4, 3, 2), weights=w, backend=be),
            (q, k, s, w))


def _matryoshka_clip(g, dt, dev):
    x, y = _r(g, N, D, dtype=dt, device=dev), _r(g, M, D, dtype=dt, device=dev)
    s, lab = torch.tensor(1.5, dtype=dt, device=dev), _ids(2, 0, 4, 0, device=dev)
    return (lambda be, x, y, s: Fn.matryoshka_clip_loss(x, y, s, dims=(4, 2), weights=(0.5, 1.0), normalize=False,
                                                        labels=lab, backend=be)), (x, y, s)


def _lse_rows(g, dt, dev):  # the dropping rules (the hardness penalty is a stop-gradient: no Hessian of its own)
    q, k = _r(g, N, D, dtype=dt, device=dev), _r(g, M, D, dtype=dt, device=dev)
    kw = dict(keep=_ids(0, 3, 4, 1, device=dev), row_ids=_ids(0, 1, 0, 1, device=dev),
              col_ids=_ids(0, 0, 1, 1, 0, device=dev), exclude_same=True, guide_queries=torch.eye(N, 3, device=dev),
              guide_keys=torch.eye(M, 3, device=dev), guide_threshold=torch.full((N,), 0.5, device=dev))
    w = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=dt, device=dev)
    return (lambda be, q, k, s: (Fn.lse_rows(q, k, s, normalize=True, backend=be, **kw) * w).sum()), (
        q, k, torch.tensor(2.0, dtype=dt, device=dev))


def _clip_masked(g, dt, dev):  # NegCLIP's negatives, false negatives by id, a guide
    x, y, neg = (_r(g, N, D, dtype=dt, device=dev), _r(g, N, D, dtype=dt, device=dev),
                 _r(g, 2, D, dtype=dt, device=dev))
    kw = dict(false_negative_ids=(_ids(0, 1, 0, 2, device=dev), _ids(1, 0, 0, 2, device=dev)),
              guide_image_features=torch.eye(N, 3, device=dev), guide_text_features=torch.eye(N, 3, device=dev),
              guide_text_negatives=torch.ones(2, 3, device=dev), guide_margin=0.1)
    return (lambda be, x, y, neg, s: Fn.clip_loss(x, y, s, text_negatives=neg, backend=be, **kw)), (
        x, y, neg, torch.tensor(2.0, dtype=dt, device=dev))


_BUILDERS = {
    "clip_loss": _clip, "clip_loss(labels,bias,normalize)": _clip_labels, "clip_loss(ids)": _clip_ids,
    "oblique_clip_loss": _oblique, "adaptive_temperature_clip_loss": _adaptive, "siglip_loss": _siglip,
    "siglip_loss(labels)": _siglip_labels, "siglip_loss(negative_only)": _siglip_negative_only,
    "siglip_loss(ids,inverse_count)": _siglip_plus, "ce_rows": _ce_rows, "max_margin_loss(per-pair margin)": _margin,
    "max_margin_loss(labels,sum)": _margin_labels, "max_margin_loss(hardest)": _margin_hardest,
    "codebook_loss": _codebook, "momentum_contrastive_loss": _momentum, "distill_clip_loss": _distill,
    "lse_rows(masks)": _lse_rows, "clip_loss(false_negative_ids,guide)": _clip_masked,
    "matryoshka_ce_rows": _matryoshka_ce_rows, "matryoshka_clip_loss(labels,dot)": _matryoshka_clip,
}
# name -> (the dispatcher op, from the one op list; the builder of its inputs)
CASES = {name: (dispatch_of(name.split("(")[0] if name not in oplist.OP else name), make)
         for name, make in _BUILDERS.items()}


def test_every_public_loss_of_the_op_list_is_covered():
    assert not uncovered(CASES), uncovered(CASES)


def _device(backend):
    if backend == "triton":
        return kernel_device()
    return torch.device("cuda" if backend == "cuda" else "cpu")


def case_params(backends_of=lambda op: existing_backends(op) + (("auto",) if op == "infonce" else ())):
    """(case, backend) parameters, each skipped with its reason where the backend exists but cannot run the op
    here; by default every backend the op has, and "auto" (= dense at these sizes; see also below) for the
    InfoNCE family."""
    out = []
    for name, (op, _) in CASES.items():
        for be in backends_of(op):
            reason = None if be == "auto" else unavailable_reason(op, be, _device(be))
            out.append(pytest.param(name, be, id=f"{name}-{be}",
                                    marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return out


@pytest.mark.parametrize("name,backend", case_params())
def test_double_backward_exact_or_raises(name, backend):
    op, make = CASES[name]
    g = torch.Generator().manual_seed(0)
    if backend in EXACT:
        loss, inputs = make(g, torch.float64, torch.device("cpu"))
        inputs = tuple(t.detach().requires_grad_() for t in inputs)
        # fast mode: the second derivatives along random directions vs finite differences (a wrong Hessian term
        # fails it as surely as the full Jacobian would, at a fraction of the cost)
        assert gradgradcheck(lambda *t: loss(backend, *t), inputs, fast_mode=True), f"{name}/{backend}"
        return
    # fused kernels (float32: the real kernels, the Triton interpreter on the CPU)
    loss, inputs = make(g, torch.float32, _device(backend))
    inputs = tuple(t.detach().requires_grad_() for t in inputs)
    out = loss(backend, *inputs)
    assert torch.isfinite(out)
    first = torch.autograd.grad(out, inputs)  # first order: unaffected
    assert all(torch.isfinite(t).all() for t in first)
    with pytest.raises(RuntimeError, match=rf"^fastcontrast: double backward is not supported by backend "
                                           rf"'{backend}' for .*use backend='reference'"):
        torch.autograd.grad(loss(backend, *inputs), inputs, create_graph=True)


def test_auto_below_the_crossover_is_exact():
    """The silent failure of the issue: "auto" at a small float64 batch takes the dense path; its gradient of the
    gradient (a gradient penalty ‖∇ₓL‖²) now equals the reference's."""
    g = torch.Generator().manual_seed(3)
    x, y = _r(g, 6, 5, dtype=torch.float64, device="cpu"), _r(g, 7, 5, dtype=torch.float64, device="cpu")
    s = torch.tensor(4.0, dtype=torch.float64)
    lab = torch.tensor([0, 6, 2, 2, 5, 1])
    grads = {}
    for be in ("auto", "dense", "reference"):
        xs, ss = x.clone().requires_grad_(), s.clone().requires_grad_()
        gx, = torch.autograd.grad(Fn.clip_loss(xs, y, ss, labels=lab, normalize=True, backend=be), xs,
                                  create_graph=True)
        grads[be] = torch.autograd.grad(gx.pow(2).sum(), (xs, ss))
    for be in ("auto", "dense"):
        for got, ref in zip(grads[be], grads["reference"]):
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def _count_reference_calls(monkeypatch):
    from fastcontrast.losses import clip_loss_reference as reference

    calls = []
    orig = reference.infonce_reference

    def counted(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(reference, "infonce_reference", counted)
    return calls


@pytest.mark.parametrize("labels", [False, True], ids=["DenseClip", "DenseInfoNCE"])
def test_dense_first_order_backward_does_not_recompute(monkeypatch, labels):
    """Only create_graph=True recomputes through the reference; the plain backward is the hand-written one."""
    calls = _count_reference_calls(monkeypatch)
    g = torch.Generator().manual_seed(1)
    x, y = (_r(g, 5, 4, dtype=torch.float32, device="cpu").requires_grad_() for _ in range(2))
    s = torch.tensor(2.0, requires_grad=True)
    lab = torch.tensor([1, 0, 4, 3, 3]) if labels else None
    Fn.clip_loss(x, y, s, labels=lab, backend="dense").backward()
    assert calls == []
    first = (x.grad.clone(), y.grad.clone(), s.grad.clone())
    got = torch.autograd.grad(Fn.clip_loss(x, y, s, labels=lab, backend="dense"), (x, y, s), create_graph=True)
    assert len(calls) == 1  # the differentiable gradient comes from the reference's graph ...
    for a, b in zip(got, first):  # ... and is the same gradient
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dense_backward_under_torch_compile_does_not_recompute(monkeypatch):
    """torch.compile traces the backward without grad mode: the compiled first-order backward is the hand-written
    one (no reference call while tracing or running), and its gradients match eager."""
    calls = _count_reference_calls(monkeypatch)
    g = torch.Generator().manual_seed(2)
    x0, y0 = _r(g, 6, 4, dtype=torch.float32, device="cpu"), _r(g, 6, 4, dtype=torch.float32, device="cpu")
    lab = torch.tensor([1, 0, 2, 5, 4, 4])

    def f(x, y, s):
        return Fn.clip_loss(x, y, s, backend="dense") + Fn.clip_loss(x, y, s, labels=lab, backend="dense")

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    res = []
    for fn in (compiled, f):
        x, y, s = x0.clone().requires_grad_(), y0.clone().requires_grad_(), torch.tensor(2.0, requires_grad=True)
        fn(x, y, s).backward()
        res.append((x.grad, y.grad, s.grad))
    assert calls == []
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_teacher_weighted_keys_double_backward_is_exact():
    """The distillation's V = softmax(t·T_q T_kᵀ)·values op: its backward is linear in the upstream gradient, so
    it has an exact derivative of its own (the op again) instead of an error."""
    from fastcontrast.primitives.weighted_keys import teacher_weighted_keys

    g = torch.Generator().manual_seed(4)
    tq, tk = _r(g, 4, 3, dtype=torch.float64, device="cpu"), _r(g, 5, 3, dtype=torch.float64, device="cpu")
    vals = _r(g, 5, 2, dtype=torch.float64, device="cpu").requires_grad_()
    w = _r(g, 4, 2, dtype=torch.float64, device="cpu")
    t = torch.tensor(1.7, dtype=torch.float64)
    assert gradgradcheck(lambda v: (teacher_weighted_keys(tq, tk, t, v)[0] * w).sum().sin(), (vals,))


def test_fused_backward_ops_guard_direct_callers():
    """torch.ops.fastcontrast.lse_pair_backward called directly (its autograd raises, it is not differentiable)."""
    from fastcontrast.primitives.lse_pair import lse_pair, lse_pair_backward

    g = torch.Generator().manual_seed(5)
    x, y = (_r(g, 4, 3, dtype=torch.float32, device="cpu").requires_grad_() for _ in range(2))
    a, c, b = torch.full((4,), 2.0), torch.full((4,), 2.0), torch.zeros(())
    lr, lc = lse_pair(x.detach(), y.detach(), a, c, b, False, 1, "cpu", "cpu")
    dx, _, _, _ = lse_pair_backward(torch.ones(4), torch.ones(4), x, y, a, c, b, lr, lc, False, 1, "cpu")
    with pytest.raises(RuntimeError, match="fastcontrast: double backward is not supported by backend 'cpu'"):
        dx.sum().backward()


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device: the CUDA-tensor paths of the fused backends")
def test_double_backward_raises_on_cuda_tensors():
    x, y = (torch.randn(8, 16, device="cuda", requires_grad=True) for _ in range(2))
    s = torch.tensor(2.0, device="cuda", requires_grad=True)
    for be in ("triton", "cuda"):
        if unavailable_reason("infonce", be, torch.device("cuda")) is not None:
            continue
        with pytest.raises(RuntimeError, match=f"backend '{be}'"):
            torch.autograd.grad(Fn.clip_loss(x, y, s, backend=be), (x, y, s), create_graph=True)
    x64, y64 = (t.detach()[:4, :3].double().clone().requires_grad_() for t in (x, y))
    assert gradgradcheck(lambda a, b: Fn.clip_loss(a, b, 2.0, backend="dense"), (x64, y64))
