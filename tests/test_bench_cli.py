"""The bench says what it did: progress, where it wrote, min/median/max, a legend, a PNG (or why not)."""
import os
import subprocess
import sys


def test_bench_reports_and_writes(tmp_path):
    out = tmp_path / "bench-out"
    r = subprocess.run([sys.executable, "-m", "fastcontrast", "bench", "--ops", "clip_loss,siglip_loss,max_margin_loss(mmts_margin)",
                        "--sizes", "16,32", "--dim", "16", "--reps", "2", "--no-compile", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fwd+bwd ms (min/med/max)" in r.stdout
    assert "| siglip_loss | 32 |" in r.stdout and "| max_margin_loss(mmts_margin) | 16 |" in r.stdout
    assert "Implementations:" in r.stdout and "- reference fp32 (eager): " in r.stdout and "Timing: fwd" in r.stdout
    assert f"wrote {out}/bench.csv" in r.stdout
    assert "] 1/" in r.stderr and "done" in r.stderr  # the progress bar, one line per row in a log
    for name in ("bench.csv", "bench.md"):
        assert (out / name).stat().st_size > 0
    try:
        import matplotlib  # noqa: F401
        assert (out / "bench.png").stat().st_size > 0
    except ImportError:
        assert "no bench.png: matplotlib is not installed" in r.stdout
