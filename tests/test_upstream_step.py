""".ci/upstream_tests.sh's parts: the pytest plugin applies the patch before a trainer's tests are collected, and
the comparison of the two runs fails on any test that ends differently (else the step would prove nothing)."""
import os
import subprocess
import sys
import textwrap

import pytest

from _thirdparty import missing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UPSTREAM = os.path.join(ROOT, ".ci", "upstream")


def _junit(path, outcomes):
    cases = "".join(
        f'<testcase classname="m" name="{n}">' + {"passed": "", "failed": "<failure/>", "skipped": "<skipped/>",
                                                  "error": "<error/>"}[o] + "</testcase>"
        for n, o in outcomes.items())
    path.write_text(f'<testsuites><testsuite name="pytest">{cases}</testsuite></testsuites>')
    return str(path)


def _compare(a, b):
    return subprocess.run([sys.executable, os.path.join(UPSTREAM, "compare_junit.py"), "x", a, b],
                          capture_output=True, text=True)


def test_compare_passes_only_on_identical_outcomes(tmp_path):
    same = {"t1": "passed", "t2": "failed", "t3": "skipped"}
    r = _compare(_junit(tmp_path / "a.xml", same), _junit(tmp_path / "b.xml", same))
    assert r.returncode == 0 and "unpatched: 1 failed, 1 passed, 1 skipped; patched: 1 failed, 1 passed, 1 skipped" \
        in r.stdout
    # the same counts but two tests swapped outcomes: still a difference
    r = _compare(_junit(tmp_path / "a.xml", same), _junit(tmp_path / "c.xml", {**same, "t1": "failed",
                                                                                "t2": "passed"}))
    assert r.returncode == 1 and "m::t1: unpatched passed, patched failed" in r.stdout
    r = _compare(_junit(tmp_path / "a.xml", same), _junit(tmp_path / "d.xml", {"t1": "passed"}))
    assert r.returncode == 1 and "m::t2: unpatched failed, patched absent" in r.stdout
    r = _compare(_junit(tmp_path / "e.xml", {}), _junit(tmp_path / "f.xml", {}))
    assert r.returncode == 1 and "collected no test" in r.stdout


@pytest.mark.skipif(missing("open_clip") is not None, reason="open_clip is not installed (scripts/dev_env.sh --test)")
def test_plugin_patches_before_collection_and_the_step_sees_the_difference(tmp_path):
    """A trainer test that passes open_clip main's SigLipLoss(chunk_size=): fails on open_clip 3.3.0 as released,
    passes under the plugin's patch, and the comparison names it."""
    import importlib.util

    loss_py = os.path.join(list(importlib.util.find_spec("open_clip").submodule_search_locations)[0], "loss.py")
    if "chunk_size" in open(loss_py).read():
        pytest.skip("the installed open_clip has chunk_size itself (this test needs 3.3.0's SigLipLoss without it)")
    (tmp_path / "test_upstream_like.py").write_text(textwrap.dedent("""
        from open_clip.loss import SigLipLoss  # bound at collection, as open_clip's own tests do

        def test_chunk_size():
            assert SigLipLoss(chunk_size=4).chunk_size == 4
    """))
    env = {**os.environ, "PYTHONPATH": UPSTREAM + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("PYTEST_ADDOPTS", None)
    xml = {}
    for mode in ("none", "open_clip"):
        xml[mode] = str(tmp_path / f"{mode}.xml")
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "fastcontrast_upstream", "-p",
                            "no:cacheprovider", f"--junitxml={xml[mode]}", "test_upstream_like.py"],
                           cwd=tmp_path, env={**env, "FASTCONTRAST_UPSTREAM_PATCH": mode}, capture_output=True,
                           text=True, timeout=300)
        assert f"fastcontrast upstream run: patch = {mode}" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
        assert r.returncode == (0 if mode == "open_clip" else 1), r.stdout[-2000:]
    r = _compare(xml["none"], xml["open_clip"])
    assert r.returncode == 1 and "test_chunk_size: unpatched failed, patched passed" in r.stdout, r.stdout
