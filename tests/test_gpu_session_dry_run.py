"""benchmarks/gpu_session.sh on the CPU (FASTCONTRAST_GPU_DRY_RUN=1: interpreter, tiny sizes): the whole flow
leaves at most 8 files (what the device returns), rows reach their files as they are measured (a call stopped
mid-run keeps them), a failing step makes the call exit non-zero after every file is written, and the real call
refuses to start without the commit's hash."""
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


def _env(out, **kw):
    env = dict(os.environ, FASTCONTRAST_GPU_DRY_RUN="1", OUT=str(out), PYTHON=sys.executable,
               FC_CACHE=str(out.parent / "fc_cache"))
    env.pop("COMMIT", None)
    env.update(kw)
    return env


def test_dry_run_whole_flow_at_most_8_files(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=_env(out), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8, sorted(map(str, files))
    ab = list(csv.DictReader(open(out / "ab.csv")))
    assert {row["impl"] for row in ab} >= {"fastcontrast[triton:baseline]", "fastcontrast[triton:hopper]",
                                          "fastcontrast[triton:baseline#2]"}  # the baseline again in every round
    assert all(row["fwd_bwd_ms"] not in ("", "nan") for row in ab), ab
    # variants whose launches are identical (fp32: every variant keeps the 32-bit tiles) are measured once, labelled
    siglip = {row["impl"]: row["note"] for row in ab if row["op"] == "siglip_loss"}
    assert "same launches as baseline" in siglip["fastcontrast[triton:hopper]"], siglip
    summary = (out / "summary.md").read_text()
    assert "Paste into fastcontrast/" in summary or "nothing to paste" in summary or "nothing to choose" in summary
    assert "= baseline (same build)" in summary
    bench = list(csv.DictReader(open(out / "bench.csv")))
    impls = {row["impl"] for row in bench}
    # fastcontrast beside what users run instead: open_clip eager and compiled, the labelled float32 reference
    assert {"fastcontrast[triton]", "open_clip ClipLoss", "open_clip ClipLoss (compiled)", "reference fp32 (eager)",
            "open_clip SigLipLoss (compiled)"} <= impls, impls
    # a baseline that cannot run here is a row that says why, not a missing row
    assert any(row["impl"].startswith("Inf-CL") and row["note"] for row in bench), bench
    assert not any("FAILED" in row["note"] for row in bench), bench
    assert "pass" in (out / "validate.md").read_text() and "FAIL" not in (out / "validate.md").read_text()
    log = (out / "session.log").read_text()
    assert "validate: " in log and " s, exit 0" in log


def test_a_failing_step_fails_the_call_after_writing_every_file(tmp_path):
    out = tmp_path / "out"
    # validate on an impossible size fails; the steps after it still run; the call ends non-zero
    r = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=_env(out, STEPS="validate resources nosuchstep", VSIZE="0,0,0,0"))
    assert r.returncode != 0
    summary = (out / "summary.md").read_text()
    assert "FAILED steps: validate nosuchstep" in summary, summary
    for name in ("session.log", "device.txt", "validate.md", "resources.md", "summary.md"):
        assert (out / name).exists(), name
    assert "resources: " in (out / "session.log").read_text()  # ran after the failed step


def test_the_device_call_needs_the_commit(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=_env(out, FASTCONTRAST_GPU_DRY_RUN="0"))
    assert r.returncode == 2 and "COMMIT=" in r.stderr
    assert not out.exists()  # refused before doing anything


def test_rows_survive_a_kill_mid_run(tmp_path):
    out = tmp_path / "out"
    env = _env(out, STEPS="ab", SIZES_AB="48,64,80")
    p = subprocess.Popen(["bash", str(SCRIPT)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    ab = out / "ab.csv"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if ab.exists() and len(ab.read_text().splitlines()) >= 3:  # header + rows of the first (op, N)
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
    assert len(rows) >= 2 and len(rows) < 5 * 3 * 2, len(rows)  # stopped before all 30 rows (5 per op and N)
    assert all(float(r["fwd_bwd_ms"]) > 0 for r in rows)
    assert "| clip_loss |" in (out / "session.log").read_text() + (out / "session.ab.txt").read_text()
