"""The static report's bookkeeping, without compiling: launches are recorded as a GPU launch specialises them,
each workload is built for the archs and variants that run it, and the GPU session's written estimates are
checked against the launches' compile counts."""
import torch

from fastcontrast.aot import check_estimates, launch_record, step_compiles, unaligned_string
from fastcontrast.aot.build import _build_jobs
from fastcontrast.primitives.configs import DEFAULT_VARIANT, VARIANTS


def _kernel(A, B, Na, D, K, stride, scale, NORM: "tl.constexpr", BLOCK_M: "tl.constexpr"):  # noqa: F821
    pass


def test_a_launch_is_recorded_as_the_gpu_specialises_it():
    a = torch.zeros(64, 64)
    rec = launch_record(_kernel, (a, a[:, 1:], 37, 64, 1, 40, 0.5), dict(NORM=True, BLOCK_M=32))
    assert rec["kernel"] == "_kernel" and rec["dtype"] == "fp32"
    assert rec["constexprs"] == {"K": 1, "NORM": True, "BLOCK_M": 32}  # an integer equal to 1 is a constant
    assert rec["align"] == ["A", "D"]  # 16-divisible: the aligned pointer and 64; not 37, 40, the offset view
    assert unaligned_string(rec) == "B,Na,stride"


def _rec(kernel, tag, dtype="bf16", align=("A",), variant=None):
    return dict(module="fastcontrast.x", kernel=kernel, dtype=dtype, signature={"A": "*bf16", "Na": "i32"},
                constexprs={"PRECISION": "tf32"}, align=list(align), workloads=[tag],
                variant=variant or DEFAULT_VARIANT["sm90"])


def test_each_workload_is_built_where_it_runs():
    table = _build_jobs([_rec("_lse_fwd_kernel", "report/bf16", align=("A", "Na"))], ("sm80", "sm90", "sm100"),
                        list(VARIANTS))
    assert {j["arch"] for j in table} == {"sm80", "sm90", "sm100"}  # the table: every arch, every variant
    assert {v for j in table for v in j["variants"]} == set(VARIANTS)
    val = _build_jobs([_rec("_lse_fwd_kernel", "validate/bf16")], ("sm80", "sm90", "sm100"), list(VARIANTS))
    assert [(j["arch"], j["variants"]) for j in val] == [("sm90", [DEFAULT_VARIANT["sm90"]])]  # the device, as run
    ab = _build_jobs([_rec("_lse_fwd_kernel", "bench/clip/bf16/grad")], ("sm90",), list(VARIANTS))
    assert sorted(v for j in ab for v in j["variants"]) == sorted(VARIANTS)  # the A/B runs every variant
    assert val[0]["unaligned"] == "Na"


def test_step_compile_counts_share_one_cache():
    launches = [_rec("_lse_fwd_kernel", "validate/bf16"), _rec("_lse_fwd_kernel", "bench/clip_loss/bf16/grad")]
    counts = step_compiles(launches, ["validate", "ab", "bench", "resources"])
    # validate builds the default variant; the A/B the other three configs (the same launch here); bench and
    # resources only what is cached
    assert counts == {"validate": 1, "ab": len(VARIANTS) - 1, "bench": 0, "resources": 0}


def _script(tmp_path, n_validate, lo, hi, limit, t_var=None):
    p = tmp_path / "session.sh"
    p.write_text(f'STEPS=${{STEPS:-"validate"}}\n# estimate start: 8 s (x)\n'
                 f"# estimate validate: {n_validate} Triton compiles x 0.6-1.2 s + 10 s = {lo}-{hi} s "
                 f"(limit {limit} s)\nT_validate={t_var or limit}\n")
    return str(p)


def test_the_session_estimates_are_checked(tmp_path, capsys):
    launches = [_rec("_lse_fwd_kernel", "validate/bf16")]
    assert check_estimates(launches, _script(tmp_path, 1, 11, 11, 20)) == 0
    assert check_estimates(launches, _script(tmp_path, 1, 11, 12, 20)) == 1  # sums that do not add up
    assert check_estimates(launches, _script(tmp_path, 1, 11, 11, 20, t_var=30)) == 1  # not the limit used
    capsys.readouterr()
    assert check_estimates(launches, _script(tmp_path, 2, 11, 12, 20)) == 0  # a stale count that still fits
    assert "stale: the launches give 1 compiles" in capsys.readouterr().out
    many = [_rec("_lse_fwd_kernel", "validate/bf16", align=(f"x{i}",)) for i in range(200)]  # 200 distinct builds
    assert check_estimates(many, _script(tmp_path, 1, 11, 11, 20)) == 1  # 200 compiles: the limit has no margin
    assert check_estimates(many, _script(tmp_path, 200, 130, 250, 400)) == 1  # fits its limit, not the 240 s


_DESCRIBE = r"""
import json, sys
sys.path.insert(0, "benchmarks")
from kernel_resources import _describe
from fastcontrast.aot import compile_one, spec_string, unaligned_string
from fastcontrast.primitives.configs import VARIANTS
rec = json.loads(sys.argv[1])
k, _, _ = compile_one(rec, "sm90", VARIANTS["hopper"][rec["kernel"]][("sm90", "16")])
fn = getattr(__import__(rec["module"], fromlist=[rec["kernel"]]), rec["kernel"])
print(json.dumps([list(_describe(fn, k)), [rec["dtype"], spec_string(rec["constexprs"]), unaligned_string(rec)]]))
"""


def test_the_driver_side_reads_a_build_as_the_table_writes_it():
    """benchmarks/kernel_resources.py finds a kernel compiled on the GPU in the static table by (dtype, spec,
    unaligned): the same strings from a compiled kernel as from the captured launch."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from fastcontrast import siglip_loss
    from fastcontrast.aot import install_launch_hook

    recs = []
    remove = install_launch_hook(recs.append)
    try:
        x = torch.randn(37, 40, dtype=torch.bfloat16)  # odd sizes and width: unaligned arguments
        with torch.no_grad():
            siglip_loss(x, x.flip(0), torch.tensor(10.0), torch.tensor(-10.0), backend="triton")
    finally:
        remove()
    rec = next(r for r in recs if r["kernel"] == "_softplus_rows_kernel")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a GPU build, not the interpreter's
    r = subprocess.run([sys.executable, "-c", _DESCRIBE, json.dumps(rec)], capture_output=True, text=True, env=env,
                       cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    driver, table = json.loads(r.stdout.strip().splitlines()[-1])
    assert driver == table and table[2] != "-", (driver, table)
