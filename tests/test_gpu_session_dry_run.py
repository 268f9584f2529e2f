"""benchmarks/gpu_session.sh on the CPU (FASTCONTRAST_GPU_DRY_RUN=1: interpreter, tiny sizes): the whole flow
leaves at most 8 files (what the device returns), and rows reach their files as they are measured, so a call
stopped mid-run keeps them."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"


def _env(out):
    return dict(os.environ, FASTCONTRAST_GPU_DRY_RUN="1", OUT=str(out), PYTHON=sys.executable)


def test_dry_run_whole_flow_at_most_8_files(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8, sorted(map(str, files))
    ab = list(csv.DictReader(open(tmp_path / "ab.csv")))
    assert {row["impl"] for row in ab} >= {"fastcontrast[triton:baseline]", "fastcontrast[triton:hopper]"}
    assert all(row["fwd_bwd_ms"] not in ("", "nan") for row in ab), ab
    summary = (tmp_path / "summary.md").read_text()
    assert "Paste into fastcontrast/ops/_configs.py" in summary
    bench = list(csv.DictReader(open(tmp_path / "bench.csv")))
    # a baseline that cannot run here is a row that says why, not a missing row
    assert any(row["impl"].startswith("Inf-CL") and row["note"] for row in bench), bench
    assert "pass" in (tmp_path / "validate.md").read_text()


def test_rows_survive_a_kill_mid_run(tmp_path):
    env = dict(_env(tmp_path), STEPS="ab", SIZES_AB="48,64,80")
    p = subprocess.Popen(["bash", str(SCRIPT)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    ab = tmp_path / "ab.csv"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if ab.exists() and len(ab.read_text().splitlines()) >= 3:  # header + 2 rows, more to come
                break
            if p.poll() is not None:
                pytest.fail("the run ended before it could be stopped")
            time.sleep(0.5)
        else:
            pytest.fail("no rows streamed to ab.csv")
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    rows = list(csv.DictReader(open(ab)))
    assert len(rows) >= 2 and len(rows) < 4 * 3 * 2, len(rows)  # stopped before all 24 rows
    assert all(float(r["fwd_bwd_ms"]) > 0 for r in rows)
    assert "| clip |" in (tmp_path / "session.log").read_text() + (tmp_path / "session.ab.txt").read_text()
