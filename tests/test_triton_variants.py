"""Every variant of the Triton launch table (primitives/configs.VARIANTS) against the float64 reference on the
interpreter: the variant's code paths (flattened tile×K loop, column-split forward grid, grouped backward order)
with the interpreter's small tiles on shapes that make the split and the grouping real, and the variant's own
sm_90 tiles (128×128×64 and the rest) on a ragged shape; fp32, bf16 and fp16."""
import pytest
import torch

from fastcontrast.primitives import configs as _configs
from fastcontrast.primitives import lse_pair as F
from fastcontrast.validate import default_cases

from conftest import assert_matches_reference, backend_param, kernel_device

VARIANTS = sorted(_configs.VARIANTS)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TRITON = backend_param("infonce", "triton")


@pytest.fixture
def variant(request):
    _configs.set_variant(request.param)
    yield request.param
    _configs.set_variant(None)


def test_every_variant_is_a_full_table():
    base = _configs.VARIANTS["baseline"]
    for name, table in _configs.VARIANTS.items():
        assert set(table) == set(base), name
        for kernel, by in table.items():
            assert set(by) == set(base[kernel]), (name, kernel)
    assert set(_configs.DEFAULT_VARIANT) == set(_configs.ARCHS)


def test_variant_selection_env_and_function(monkeypatch):
    monkeypatch.setenv(_configs.ENV_VARIANT, "baseline")
    assert _configs.variant("sm90") == "baseline"
    _configs.set_variant("hopper_2cta")
    try:
        assert _configs.variant("sm90") == "hopper_2cta"
    finally:
        _configs.set_variant(None)
    monkeypatch.setenv(_configs.ENV_VARIANT, "nope")
    with pytest.raises(ValueError, match="FASTCONTRAST_TRITON_VARIANT"):
        _configs.variant("sm90")
    with pytest.raises(ValueError, match="variant must be one of"):
        _configs.set_variant("nope")
    monkeypatch.delenv(_configs.ENV_VARIANT)
    assert _configs.variant("sm90") == _configs.DEFAULT_VARIANT["sm90"]


def test_default_hopper_s_tiles_are_wide():
    table = _configs.VARIANTS[_configs.DEFAULT_VARIANT["sm90"]]
    for kernel in ("_lse_fwd_kernel", "_grad_tile_kernel", "_hinge_pair_fwd_kernel", "_hinge_pair_grad_tile_kernel"):
        cfg = table[kernel][("sm90", "16")]
        assert cfg["BLOCK_M"] >= 128 and cfg["BLOCK_N"] >= 128, (kernel, cfg)


# N = 37 rows (2 row blocks of 32) against M = 150 columns (5 column tiles): the split forward grid uses 2 splits
# on the interpreter's 4 pretend SMs, the grouped backward order spans several groups, every tile is ragged.
SPLIT_SHAPE = dict(n=37, m=150, d=72, k=3)


def test_split_shape_exercises_the_column_split():
    for name in VARIANTS:
        _configs.set_variant(name)
        try:
            cfg = _configs.config("_lse_fwd_kernel", torch.device("cpu"), torch.float32)
            split = F._column_split(2, 150 // cfg["BLOCK_N"] + 1, torch.device("cpu"), cfg)
            assert split == (2 if cfg["COL_SPLIT"] else 1), (name, split)
        finally:
            _configs.set_variant(None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
@pytest.mark.parametrize("backend", [TRITON])
def test_variant_code_paths_match_reference(backend, variant, dtype):
    for case in default_cases(**SPLIT_SHAPE):
        if case.op in ("infonce", "siglip", "max_margin"):
            assert_matches_reference(case, backend, dtype, kernel_device(), seeds=(0,))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
@pytest.mark.parametrize("backend", [TRITON])
def test_variant_own_tiles_match_reference(backend, variant, dtype, monkeypatch):
    if kernel_device().type == "cuda":
        pytest.skip("on a GPU the variant's own tiles are what every other test runs")
    monkeypatch.setattr(_configs, "INTERPRET_REAL_TILES", True)
    names = ("clip_loss(normalize)", "clip_loss", "siglip_loss", "max_margin(diagonal)")
    for case in default_cases(n=150, m=141, d=136, k=2):
        if case.name in names:
            assert_matches_reference(case, backend, dtype, kernel_device(), seeds=(1,))


# The hinge forward (_hinge_fwd_kernel) under every variant: its flattened (column tile × K-chunk) loop in hopper and
# hopper_2cta, the nested one elsewhere. 70 rows (3 row blocks of 32), 150 columns (5 ragged column tiles), d = 200
# (7 K-chunks, the last ragged); labelled (both HingeRows directions) and hardest (HardestPair), normalised or not.
HINGE_SHAPE = dict(n=70, m=150, d=200)


def _hinge_cases(n, m, d):
    from fastcontrast import functional as Fn
    from fastcontrast import oplist
    from fastcontrast.validate import Case

    def make(g, dev, dt):  # the op list's inputs of the labelled hinge (N != M: labels)
        return oplist.get("max_margin_loss").make(g, dev, dt, n, m, d, 1)

    return [Case(f"max_margin({'hardest' if h else 'sum'}, normalize={nm})", "max_margin", make,
                 lambda backend, h=h, nm=nm, **kw: Fn.max_margin_loss(**kw, margin=0.3, hardest=h, normalize=nm,
                                                                     backend=backend))
            for h in (False, True) for nm in (True, False)]


def test_hinge_forward_flat_follows_the_infonce_forward():
    for name in VARIANTS:
        _configs.set_variant(name)
        try:
            cpu = torch.device("cpu")
            hinge = _configs.config("_hinge_fwd_kernel", cpu, torch.float32)
            assert hinge["FLAT"] == _configs.config("_lse_fwd_kernel", cpu, torch.float32)["FLAT"], name
            assert hinge["FLAT"] == (name in ("hopper", "hopper_2cta")), name
            for by in _configs.VARIANTS[name]["_hinge_fwd_kernel"].values():
                assert by["FLAT"] == hinge["FLAT"], name
        finally:
            _configs.set_variant(None)
    # the shape spans several row blocks, column tiles and K-chunks of the interpreter's tiles, all ragged
    t = _configs.INTERPRETER
    assert HINGE_SHAPE["n"] > 2 * t["BLOCK_M"] and HINGE_SHAPE["m"] > 4 * t["BLOCK_N"]
    assert HINGE_SHAPE["d"] > 6 * t["BLOCK_K"] and HINGE_SHAPE["d"] % t["BLOCK_K"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
@pytest.mark.parametrize("backend", [TRITON])
def test_variant_hinge_forward_matches_reference(backend, variant, dtype):
    for case in _hinge_cases(**HINGE_SHAPE):
        assert_matches_reference(case, backend, dtype, kernel_device(), seeds=(0,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
@pytest.mark.parametrize("backend", [TRITON])
def test_variant_hinge_own_tiles_match_reference(backend, variant, dtype, monkeypatch):
    """The sm_90 tiles (16-bit 128×128×64, fp32 128×64×32): 150 × 141 spans two row blocks and 2-3 column
    tiles, d = 136 three (16-bit) or five (fp32) K-chunks, the last ragged."""
    if kernel_device().type == "cuda":
        pytest.skip("on a GPU the variant's own tiles are what every other test runs")
    monkeypatch.setattr(_configs, "INTERPRET_REAL_TILES", True)
    for case in _hinge_cases(n=150, m=141, d=136)[::3]:  # (sum, normalised) and (hardest, raw)
        assert_matches_reference(case, backend, dtype, kernel_device(), seeds=(1,))


@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
@pytest.mark.parametrize("hardest", [False, True], ids=["sum", "hardest"])
def test_variant_hinge_forward_keeps_nan(variant, hardest):
    """The NaN of an overflowed S reaches the loss on every code path: row 5's positive and one negative (in the
    last column tile, the product in the last ragged K-chunk) overflow fp32 to +inf, so z = (0.3 − inf) + inf is
    NaN there, and [z]_+ keeps it; the hardest variant's loss is non-finite too. (A NaN feature would make a whole row or column
    of S NaN, on which the interpreter's argmax raises.)"""
    from fastcontrast import functional as Fn

    g = torch.Generator().manual_seed(3)
    n, m, d = HINGE_SHAPE["n"], HINGE_SHAPE["m"], HINGE_SHAPE["d"]
    x, y = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    labels = torch.randint(0, m, (n,), generator=g)
    labels[5] = 3
    x[5, 190] = y[3, 190] = y[137, 190] = 1e20  # S_5,3 = S_5,137 = 1e40: +inf in fp32
    dev = kernel_device()
    out = Fn.max_margin_loss(x.to(dev), y.to(dev), margin=0.3, labels=labels.to(dev), hardest=hardest,
                             normalize=False, backend="triton")
    if hardest:  # HardestPair's offset of row 5 is finite, so its hardest z is +inf: no plausible number either
        assert not torch.isfinite(out).any(), out
    else:
        assert torch.isnan(out).all(), out


def test_unaligned_launches_get_the_narrow_tile_and_keep_the_variants_switches():
    """configs.UNALIGNED: a launch whose row width or strides are not 16-divisible (odd d, a per-token width such
    as 40/3) gets a tile that stays within 512 B of stack (the wide ones spill 544-1,040 B there: aot); the
    variant's structural switches stay; an aligned launch keeps the table's tile."""
    assert _configs.is_aligned("_lse_fwd_kernel", D=768, DT=768, stride_am=768, stride_bm=768)
    assert not _configs.is_aligned("_lse_fwd_kernel", D=40, DT=13, stride_am=40, stride_bm=40)
    assert not _configs.is_aligned("_lse_axis_kernel", C=11, stride_r=11)
    assert _configs.is_aligned("_hinge_fwd_kernel", D=13)  # no narrow tile: the rule does not apply
    for name in _configs.VARIANTS:
        for kernel, by_class in _configs.UNALIGNED.items():
            for (arch, dclass), cfg in _configs.VARIANTS[name][kernel].items():
                assert _configs.table_config(name, kernel, arch, dclass, True) == cfg
                got = _configs.table_config(name, kernel, arch, dclass, False)
                want = by_class.get(dclass)
                if want is None:
                    assert got == cfg
                    continue
                assert {k: got[k] for k in want} == want, (name, kernel, arch, dclass)
                assert {k: v for k, v in got.items() if k not in want and not k.startswith("BLOCK")} == \
                    {k: v for k, v in cfg.items() if k not in want and not k.startswith("BLOCK")
                     and k not in ("num_warps", "num_stages", "maxnreg")}
