"""Public API behaviour: dispatcher, modules, schedules, density temperature, EMA teacher, the CLI."""
import subprocess
import sys

import pytest
import torch

import fastcontrast as fc
from fastcontrast.dispatch import resolve


def test_auto_picks_reference_without_fast_backends():
    name = resolve("max_margin", "auto", torch.device("cpu")).backend
    assert name in ("cpu", "reference")
    assert "reference" in fc.available_backends("infonce", torch.device("cpu"))


def test_modules_match_functional():
    x, y = torch.randn(6, 8), torch.randn(6, 8)
    assert torch.equal(fc.ClipLoss()(x, y, 5.0), fc.clip_loss(x, y, 5.0))
    assert set(fc.ClipLoss()(x, y, 5.0, output_dict=True)) == {"contrastive_loss"}
    xt, yt = torch.randn(6, 3, 4), torch.randn(6, 3, 4)
    m = fc.ObliqueClipLoss(logit_scale=2.0, learn_scale=True)
    loss = m(xt, yt)
    loss.backward()
    assert m.log_scale.grad is not None and torch.isfinite(m.log_scale.grad)
    assert torch.allclose(loss, fc.oblique_clip_loss(xt, yt, 2.0))
    mm = fc.MaxMarginLoss()  # the AVION baseline: fixed margin 0.2, mean over all hinge terms
    assert torch.allclose(mm(x, y), fc.max_margin_loss(x, y, 0.2))
    assert torch.allclose(fc.MaxMarginLoss(0.1, reduction="sum")(x, y), fc.max_margin_loss(x, y, 0.1, reduction="sum"))


def test_density_module_uses_schedule_and_density():
    x, y = torch.randn(10, 8), torch.randn(10, 8)
    mod = fc.DensityTemperatureClipLoss(total_steps=500, tau_min=0.02, tau_max=0.2, per_sample=False)
    assert torch.allclose(mod(x, y, step=0), fc.adaptive_temperature_clip_loss(x, y, 0.2, normalize=True))
    mod = fc.DensityTemperatureClipLoss(total_steps=500, tau_min=0.02, tau_max=0.2, per_sample=True, k=3)
    ti, tt = mod.temperatures(x, y, 25)
    assert ti.shape == (10,) and ((ti >= 0.02) & (ti <= 0.2)).all()
    assert torch.isfinite(mod(x, y, step=25))


def test_density_temperature_is_monotone_in_density():
    # a tight cluster of 6 points and 4 scattered points: the cluster gets the higher temperatures
    g = torch.Generator().manual_seed(0)
    centre = torch.randn(16, generator=g)
    dense = centre + 0.05 * torch.randn(6, 16, generator=g)
    sparse = torch.randn(4, 16, generator=g) * 3
    f = torch.cat([dense, sparse])
    tau = fc.density_temperature(f, 0.05, 0.01, 0.1, k=3)
    assert tau[:6].min() > tau[6:].max()
    assert ((tau >= 0.01) & (tau <= 0.1)).all()
    assert not tau.requires_grad


def test_ema_teacher_update_and_isolation():
    student = torch.nn.Linear(4, 3)
    ema = fc.EMATeacher(student, momentum=0.9)
    before = ema.teacher.weight.clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    student.weight.grad = torch.ones_like(student.weight)
    ema.update(student)
    assert torch.allclose(ema.teacher.weight, 0.9 * before + 0.1 * student.weight)
    assert torch.equal(student.weight.grad, torch.ones_like(student.weight))  # untouched
    assert not any(p.requires_grad for p in ema.teacher.parameters())
    with pytest.raises(ValueError, match="momentum"):
        fc.EMATeacher(student, momentum=1.5)


def test_codebook_stats():
    x = torch.randn(12, 8)
    loss, stats = fc.codebook_loss(x, x, x, x, torch.randn(5, 8), return_stats=True)
    assert torch.isfinite(loss)
    assert int(stats["code_usage"].sum()) == 24 and stats["code_usage"].shape == (5,)
    assert stats["dead_codes"] == int((stats["code_usage"] == 0).sum())
    assert 1.0 <= stats["perplexity"] <= 5.0


def test_validate_cli_prints_table():
    r = subprocess.run([sys.executable, "-m", "fastcontrast", "validate", "--seeds", "1", "--dtype", "float32"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| op " in r.stdout and "clip_loss" in r.stdout and "reference" in r.stdout
    assert "all passed" in r.stdout


def test_auto_is_size_aware():
    from fastcontrast.dispatch import crossover, set_crossover

    dev = torch.device("cpu")
    before = crossover("cpu")
    try:
        set_crossover("cpu", 100)
        assert resolve("infonce", "auto", dev, 10 * 10).backend == "dense"  # small: materialised
        assert resolve("siglip", "auto", dev, 10 * 10).backend == "reference"  # no dense path: the reference
        big = resolve("infonce", "auto", dev, 11 * 11).backend
        assert big == ("cpu" if fc.dispatch.unavailable_reason("infonce", "cpu", dev) is None else "reference")
        x, y = torch.randn(10, 8), torch.randn(10, 8)
        assert torch.allclose(fc.clip_loss(x, y, 5.0), fc.clip_loss(x, y, 5.0, backend="dense"))
        with pytest.raises(ValueError, match="device_type must be 'cpu' or 'cuda'"):
            set_crossover("tpu", 1)
    finally:
        set_crossover("cpu", before)


@pytest.mark.parametrize("labels,normalize,tokens", [(False, False, 1), (False, True, 2), (True, True, 1)])
def test_dense_path_gradcheck_float64(labels, normalize, tokens):
    """The materialised path's hand-written backward, through the public API, in float64."""
    from torch.autograd import gradcheck

    n, m = 6, (8 if labels else 6)
    x = torch.randn(n, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randn(m, 6, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    lab = torch.tensor([0, 3, 7, 7, 1, 2]) if labels else None
    assert gradcheck(lambda x, y, s: fc.clip_loss(x, y, s, labels=lab, normalize=normalize, backend="dense"),
                     (x, y, s))
    if tokens > 1:
        assert gradcheck(lambda x, y, s: fc.oblique_clip_loss(x.view(n, 2, 3), y.view(m, 2, 3), s, backend="dense"),
                         (x, y, s))
    t = (0.1 + torch.rand(n, dtype=torch.float64)).requires_grad_()
    if not labels:
        assert gradcheck(lambda x, y, t: fc.adaptive_temperature_clip_loss(x, y, t, backend="dense"), (x, y, t))


def test_available_backends_without_arguments_lists_every_op():
    table = fc.available_backends()
    assert {"infonce", "siglip", "max_margin", "swapped_prediction", "sinkhorn", "momentum_contrastive"} <= set(table)
    assert all("reference" in devs["cpu"] for devs in table.values())
    assert "dense" in table["infonce"]["cpu"]
    assert fc.available_backends("infonce") == {d: table["infonce"][d] for d in table["infonce"]}


def test_validate_lists_skipped_backends_with_reasons():
    from fastcontrast.validate import run_validation

    lines = []
    run_validation(devices=["cpu"], dtypes=[torch.float32], seeds=(0,), out=lines.append)
    text = "\n".join(lines)
    assert "skipped:" in text  # e.g. backend 'cuda' on CPU tensors, or 'triton' without the interpreter
    assert "cuda" in text
