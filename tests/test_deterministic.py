"""Deterministic mode (issue 20, point 3): no fastcontrast kernel accumulates with float atomics when
``torch.use_deterministic_algorithms(True)`` is on, so two runs give the same bits.

* Triton: every kernel reduces through per-tile partials summed in a fixed order (the InfoNCE backward's scale
  gradients were the last float atomics), in either mode: counted here under the interpreter, and the results are
  bitwise identical across runs and modes and equal to the float64 reference.
* CUDA extension (csrc/): its backward adds the scale gradients with atomicAdd, so in deterministic mode the
  launcher switches to the PyTorch tiles (the same math, fixed-order reductions); the switch is tested here on the
  CPU with the kernel replaced by a sentinel, bitwise identity on a GPU when one is present.
"""
import os
import subprocess
import sys
import types

import pytest
import torch

from _ops import dispatch_of, uncovered
from fastcontrast import oplist
import fastcontrast.functional as Fn
from conftest import HAS_CUDA, INTERPRET, kernel_device
from fastcontrast.dispatch import unavailable_reason
from fastcontrast.validate import rel_err

N, M, D = 100, 70, 8  # two slabs of two row tiles, three column tiles of the interpreter's 32×32 launch


@pytest.fixture
def deterministic():
    """Sets torch.use_deterministic_algorithms for the test, restores it after."""
    prev = torch.are_deterministic_algorithms_enabled()
    yield torch.use_deterministic_algorithms
    torch.use_deterministic_algorithms(prev)


@pytest.mark.skipif(not INTERPRET, reason="counts atomics through the Triton interpreter (TRITON_INTERPRET=1)")
def test_the_atomic_counter_counts(atomics):
    """The counter is not vacuous: a kernel with tl.atomic_add is seen by it."""
    import triton
    import triton.language as tl

    @triton.jit
    def _add(out, BLOCK: tl.constexpr):
        tl.atomic_add(out + tl.arange(0, BLOCK) % 2, tl.full((BLOCK,), 1.0, tl.float32))

    out = torch.zeros(2)
    _add[(3,)](out, BLOCK=4)
    assert atomics["n"] == 3 and out.tolist() == [6.0, 6.0]


def _r(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _ids(g, n, hi):
    return torch.randint(0, hi, (n,), generator=g)


# name -> (dispatcher op, make(g) -> (loss(backend, **inputs), float64 inputs; those with "grad" get gradients)).
def _clip(g):
    lab = _ids(g, N, M)
    return (lambda be, x, y, s, b: Fn.clip_loss(x, y, s, b, labels=lab, normalize=True, backend=be),
            dict(x=_r(g, N, D), y=_r(g, M, D), s=torch.tensor(5.0, dtype=torch.float64),
                 b=torch.tensor(-1.0, dtype=torch.float64)))


def _oblique(g):
    return (lambda be, x, y, s: Fn.oblique_clip_loss(x, y, s, backend=be),
            dict(x=_r(g, N, 2, D // 2), y=_r(g, N, 2, D // 2), s=torch.tensor(2.0, dtype=torch.float64)))


def _adaptive(g):
    lab = _ids(g, N, M)
    return (lambda be, x, y, ti, tt: Fn.adaptive_temperature_clip_loss(x, y, ti, tt, labels=lab, backend=be),
            dict(x=_r(g, N, D), y=_r(g, M, D), ti=0.2 + torch.rand(N, generator=g, dtype=torch.float64),
                 tt=0.2 + torch.rand(M, generator=g, dtype=torch.float64)))


def _clip_ids(g):
    ii, ti = _ids(g, N, 40), _ids(g, M, 40)
    return (lambda be, x, y, s: Fn.clip_loss(x, y, s, image_ids=ii, text_ids=ti, backend=be),
            dict(x=_r(g, N, D), y=_r(g, M, D), s=torch.tensor(3.0, dtype=torch.float64)))


def _ce_rows(g):
    lab = _ids(g, N, M)
    return (lambda be, a, b, s: Fn.ce_rows(a, b, s, labels=lab, backend=be),
            dict(a=_r(g, N, D), b=_r(g, M, D), s=torch.tensor(4.0, dtype=torch.float64)))


def _matryoshka(kind):
    def make(g):  # D = 8: prefix ends 8, 5, 2 (two inside the interpreter's 32-wide K-chunk)
        lab = _ids(g, N, M)
        fn = Fn.matryoshka_ce_rows if kind == "ce_rows" else Fn.matryoshka_clip_loss
        return (lambda be, x, y, s: fn(x, y, s, labels=lab, dims=(8, 5, 2), weights=(1.0, 0.5, 2.0), backend=be),
                dict(x=_r(g, N, D), y=_r(g, M, D), s=torch.tensor(4.0, dtype=torch.float64)))
    return make


def _lse_rows(g):  # every rule, the guide in the same sweep
    keep, rid, cid = _ids(g, N, M), _ids(g, N, 3), _ids(g, M, 3)
    gq, gk, hard = _r(g, N, 4).float(), _r(g, M, 4).float(), torch.rand(M, generator=g) < 0.4
    return (lambda be, q, k, s: Fn.lse_rows(q, k, s, normalize=True, keep=keep, row_ids=rid, col_ids=cid,
                                            exclude_same=True, guide_queries=gq, guide_keys=gk,
                                            guide_threshold=torch.full((N,), 0.3), hard_cols=hard,
                                            hardness_strength=2.0, hardness_cells={"same_hard", "other_inbatch"},
                                            backend=be).sum(),
            dict(q=_r(g, N, D), k=_r(g, M, D), s=torch.tensor(4.0, dtype=torch.float64)))


def _clip_masked(g):  # negatives, false negatives, a guide: row and column statistics of one masked sweep
    lab, ii, ti = _ids(g, N, M), _ids(g, N, 3), _ids(g, M, 3)
    gx, gy, gn = _r(g, N, 4).float(), _r(g, M, 4).float(), _r(g, 3, 4).float()
    return (lambda be, x, y, neg, s: Fn.clip_loss(x, y, s, labels=lab, normalize=True, text_negatives=neg,
                                                  false_negative_ids=(ii, ti), guide_image_features=gx,
                                                  guide_text_features=gy, guide_text_negatives=gn,
                                                  guide_margin=0.2, backend=be),
            dict(x=_r(g, N, D), y=_r(g, M, D), neg=_r(g, 3, D), s=torch.tensor(4.0, dtype=torch.float64)))


def _siglip(g):
    lab = _ids(g, N, M)
    return (lambda be, x, y, s, b: Fn.siglip_loss(x, y, s, b, labels=lab, backend=be),
            dict(x=_r(g, N, D), y=_r(g, M, D), s=torch.tensor(3.0, dtype=torch.float64),
                 b=torch.tensor(-2.0, dtype=torch.float64)))


def _margin(kind):
    def make(g):
        lab = None if kind == "diagonal" else _ids(g, N, M)
        y = _r(g, N if kind == "diagonal" else M, D)
        return (lambda be, x, y: Fn.max_margin_loss(x, y, 0.3, labels=lab, hardest=kind == "hardest", backend=be),
                dict(x=_r(g, N, D), y=y))
    return make


def _codebook(g):
    tx, ty, c = _r(g, N, D), _r(g, N, D), _r(g, 11, D)
    return (lambda be, x, y: Fn.codebook_loss(x, y, tx.to(x.dtype), ty.to(x.dtype), c.to(x.dtype), tau=0.3,
                                              epsilon=0.2, backend=be),
            dict(x=_r(g, N, D), y=_r(g, N, D)))


def _momentum(g):
    k, tq, qu = _r(g, N, D), _r(g, N, D), _r(g, M, D)
    return (lambda be, q, s: Fn.momentum_contrastive_loss(q, k.to(q.dtype), tq.to(q.dtype), qu.to(q.dtype), s,
                                                          backend=be),
            dict(q=_r(g, N, D), s=torch.tensor(5.0, dtype=torch.float64)))


def _distill(g):
    tx, ty = _r(g, N, 5), _r(g, N, 5)

    def loss(be, x, y, s):
        c, d = Fn.distill_clip_loss(x, y, s, tx.to(x.dtype), ty.to(x.dtype), 3.0, backend=be)
        return c + d

    return loss, dict(x=_r(g, N, D), y=_r(g, N, D), s=torch.tensor(2.0, dtype=torch.float64))


_BUILDERS = {
    "clip_loss(labels,normalize,bias)": _clip, "oblique_clip_loss": _oblique, "adaptive_temperature_clip_loss": _adaptive,
    "clip_loss(ids)": _clip_ids, "ce_rows": _ce_rows, "siglip_loss": _siglip,
    "max_margin_loss(labels)": _margin("labels"), "max_margin_loss(diagonal)": _margin("diagonal"),
    "max_margin_loss(hardest)": _margin("hardest"), "codebook_loss": _codebook,
    "momentum_contrastive_loss": _momentum, "distill_clip_loss": _distill,
    "lse_rows(masks)": _lse_rows, "clip_loss(false_negative_ids,guide)": _clip_masked,
    "matryoshka_ce_rows": _matryoshka("ce_rows"), "matryoshka_clip_loss(labels)": _matryoshka("clip"),
}
# name -> (the dispatcher op, from the one op list; the builder of its inputs)
CASES = {name: (dispatch_of(name if name in oplist.OP else name.split("(")[0]), make)
         for name, make in _BUILDERS.items()}


def test_every_public_loss_of_the_op_list_is_covered():
    assert not uncovered(CASES), uncovered(CASES)


def _run(loss, inputs, backend, dtype, device):
    leaves = {k: v.to(device=device, dtype=dtype if v.dim() >= 2 else (torch.float64 if dtype == torch.float64
                                                                        else torch.float32)).requires_grad_()
              for k, v in inputs.items()}
    out = loss(backend, **leaves)
    return [out.detach()] + list(torch.autograd.grad(out, list(leaves.values())))


@pytest.mark.parametrize("name", list(CASES))
def test_triton_deterministic_bitwise_no_atomics(name, atomics, deterministic):
    op, make = CASES[name]
    dev = kernel_device()
    reason = unavailable_reason(op, "triton", dev)
    if reason is not None:
        pytest.skip(reason)
    loss, inputs = make(torch.Generator().manual_seed(0))
    deterministic(True)
    first = _run(loss, inputs, "triton", torch.float32, dev)
    second = _run(loss, inputs, "triton", torch.float32, dev)
    deterministic(False)
    default = _run(loss, inputs, "triton", torch.float32, dev)
    if dev.type == "cpu":
        assert atomics["n"] == 0, f"{atomics['n']} float atomics under the interpreter"
    ref = _run(loss, inputs, "reference", torch.float64, torch.device("cpu"))
    for i, (a, b, c, r) in enumerate(zip(first, second, default, ref)):
        assert torch.equal(a, b), f"{name}: output {i} differs between two deterministic runs"
        assert torch.equal(a, c), f"{name}: output {i} differs between deterministic and default mode"
        close = rel_err(a, r) <= 1e-4 or float((a.double().cpu() - r).abs().max()) <= 1e-6  # the bias's exact 0
        assert torch.isfinite(a).all() and close, (name, i, rel_err(a, r))


def test_cuda_extension_backward_switches_to_deterministic_tiles(monkeypatch, deterministic):
    """Where backend 'cuda' would run its atomicAdd backward, deterministic mode takes the PyTorch tiles instead
    (exercised on CPU tensors with the CUDA kernel replaced by a sentinel); the gradients are the reference's."""
    from fastcontrast import dispatch
    from fastcontrast.losses.clip_loss_reference import lse_pair_reference
    from fastcontrast.primitives import lse_pair as F

    launched = []

    def cuda_kernel(*args):
        launched.append(1)
        raise RuntimeError("sentinel: the CUDA kernel with atomics ran")

    monkeypatch.setattr(F, "_ext", types.SimpleNamespace(_C=types.SimpleNamespace(lse_pair_cuda_backward=cuda_kernel)))
    g = torch.Generator().manual_seed(1)
    x, y = _r(g, 9, 6).float().requires_grad_(), _r(g, 11, 6).float().requires_grad_()
    a, c = (0.5 + torch.rand(9, generator=g)).requires_grad_(), (0.5 + torch.rand(11, generator=g)).requires_grad_()
    b = torch.tensor(0.3)
    g_r, g_c = torch.rand(9, generator=g), torch.rand(11, generator=g)
    lr, lc = lse_pair_reference(x, y, a, c, b)
    want = torch.autograd.grad((lr * g_r).sum() + (lc * g_c).sum(), (x, y, a, c))
    args = (g_r, g_c, x.detach(), y.detach(), a.detach(), c.detach(), b, lr.detach(), lc.detach(), False, 1)
    deterministic(True)
    impl = dispatch._impl("infonce", "cuda", torch.float32)  # the dispatcher's one decision, read at resolve
    assert (impl.kernel, impl.backward_kernel) == ("cuda", "tiles")
    got = F._backward(*args, impl.backward_kernel)
    assert launched == []
    for gg, w in zip(got, want):
        torch.testing.assert_close(gg, w, rtol=1e-5, atol=1e-6)
    deterministic(False)
    impl = dispatch._impl("infonce", "cuda", torch.float32)
    assert (impl.kernel, impl.backward_kernel) == ("cuda", "cuda")
    with pytest.raises(RuntimeError, match="sentinel"):
        F._backward(*args, impl.backward_kernel)
    assert launched == [1]


_GPU_SCRIPT = r"""
import torch, fastcontrast.functional as Fn
from fastcontrast.dispatch import unavailable_reason
torch.use_deterministic_algorithms(True)
g = torch.Generator().manual_seed(0)
n, m, d = 1500, 1300, 200  # several slabs' row tiles and column tiles on the GPU's 128-wide tiles
x0, y0 = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
lab = torch.randint(0, m, (n,), generator=g).cuda()
ran = []
for be in ("triton", "cuda"):
    if unavailable_reason("infonce", be, torch.device("cuda")) is not None:
        continue
    for dt in (torch.float32, torch.bfloat16):
        outs = []
        for _ in range(2):
            x = x0.to("cuda", dt).requires_grad_()
            y = y0.to("cuda", dt).requires_grad_()
            ti = torch.linspace(0.05, 0.2, n, device="cuda").requires_grad_()
            tt = torch.linspace(0.2, 0.05, m, device="cuda").requires_grad_()
            loss = Fn.adaptive_temperature_clip_loss(x, y, ti, tt, labels=lab, normalize=True, backend=be)
            outs.append([loss.detach()] + list(torch.autograd.grad(loss, (x, y, ti, tt))))
        for i, (a, b) in enumerate(zip(*outs)):
            assert torch.equal(a, b), (be, dt, i, (a.float() - b.float()).abs().max().item())
        ran.append(f"{be}/{dt}")
print("BITWISE", ",".join(ran))
"""


@pytest.mark.skipif(not HAS_CUDA, reason="bitwise identity of the GPU kernels needs a CUDA device")
def test_gpu_backends_bitwise_identical_in_deterministic_mode():
    """On a GPU: two runs of the InfoNCE forward and backward (per-sample scales, labels, normalisation) on the
    triton and cuda backends in deterministic mode give the same bits. A fresh process, so that cuBLAS starts with
    the workspace setting PyTorch's deterministic mode requires (CUBLAS_WORKSPACE_CONFIG)."""
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8", TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", _GPU_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "BITWISE triton" in r.stdout or "BITWISE cuda" in r.stdout, r.stdout
