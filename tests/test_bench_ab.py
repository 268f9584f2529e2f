"""The launch-table A/B's bookkeeping, without timing anything: variants that launch the same kernels are grouped
(measured once, labelled), and the launch-table line is printed only when the winner's margin exceeds the spread
the A/B measured."""
import torch

from fastcontrast.bench import ab_table, ab_verdict, variant_groups
from fastcontrast.primitives.configs import VARIANTS


def test_siglip_variants_that_share_their_builds_are_one_group():
    kernels = ["_softplus_rows_kernel", "_sigmoid_grad_tile_kernel"]
    groups = variant_groups(list(VARIANTS), kernels, "sm90", torch.bfloat16)
    assert ["baseline", "hopper_tiles", "hopper"] in groups and ["hopper_2cta"] in groups
    # CLIP's kernels differ in every variant on sm_90 (tiles, the flat loop, the grouped order)
    clip = variant_groups(list(VARIANTS), ["_lse_fwd_kernel", "_grad_tile_kernel"], "sm90", torch.bfloat16)
    assert len(clip) == len(VARIANTS)
    # in fp32 the variants keep the same 32-bit tiles; only the structural switches tell them apart
    assert len(variant_groups(list(VARIANTS), kernels, "sm90", torch.float32)) == 1


def _rows(times, spread=0.01, repeat=None):
    """A/B rows: {(op, n): {variant: median fwd+bwd}}, each with a (max - min) / median of ``spread``."""
    rows = []
    for (op, n), per in times.items():
        per = dict(per, **{"baseline#2": repeat or per["baseline"]})
        for v, t in per.items():
            rows.append(dict(op=op, n=n, impl=f"fastcontrast[triton:{v}]", fwd_ms=t / 2, fwd_bwd_ms=t,
                             fwd_bwd_min_ms=t * (1 - spread / 2), fwd_bwd_max_ms=t * (1 + spread / 2), note=""))
    return rows


def test_the_line_is_printed_only_past_the_spread():
    times = {("clip", 4096): {"baseline": 10.0, "hopper": 8.0}, ("clip", 16384): {"baseline": 40.0, "hopper": 30.0}}
    win, verdict = ab_verdict(_rows(times, spread=0.05))
    assert win == "hopper" and "Winner hopper" in verdict
    assert "DEFAULT_VARIANT['sm90'] = 'hopper'" in ab_table(_rows(times, spread=0.05), "sm90")
    # the same medians, but the rounds spread 40 %: no line
    win, verdict = ab_verdict(_rows(times, spread=0.4))
    assert win is None and "nothing to paste" in verdict
    assert "DEFAULT_VARIANT" not in ab_table(_rows(times, spread=0.4), "sm90")
    # the baseline measured twice disagrees by more than the margin: no line either
    close = {("clip", 4096): {"baseline": 10.0, "hopper": 9.5}}
    assert ab_verdict(_rows(close, spread=0.01, repeat=9.0))[0] is None


def test_grouped_variants_are_not_each_others_rivals():
    rows = _rows({("siglip", 4096): {"baseline": 10.0, "hopper": 10.0, "hopper_2cta": 12.0}})
    for r in rows:
        if r["impl"] == "fastcontrast[triton:hopper]":
            r["note"] = "same launches as baseline (measured once)"
    win, verdict = ab_verdict(rows)
    assert win in ("baseline", "hopper") and "ahead of hopper_2cta" in verdict
    assert "= baseline (same build)" in ab_table(rows, "sm90")
