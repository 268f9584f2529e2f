"""The README: CI runs its test command, every Python block runs verbatim in this venv on a CPU machine, it gives
the tests' time and a quick subset that exists, and it links only files that exist in the repository."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    block = re.search(r"# --- the README's test command, verbatim ---\n(.+?)\n# --- end ---", ci, re.S)
    assert block, ".ci/run lost its marked test command"
    cmd = block.group(1).strip()
    assert cmd in README, "README.md does not show the command .ci/run runs"


PY_BLOCKS = re.findall(r"```python\n(.+?)```", README, re.S)
# what each block must have done, checked in the same process right after the block runs verbatim
AFTER = {
    "integrations.open_clip": (
        "import open_clip.loss, transformers, fastcontrast as fc\n"
        "assert issubclass(open_clip.loss.ClipLoss, fc.ClipLoss) and issubclass(open_clip.loss.SigLipLoss, "
        "fc.SigLipLoss), 'fco.patch() did not replace open_clip.loss'\n"
        "assert CLIPModel.forward._fastcontrast, 'apply_fastcontrast_to_clip() did not patch CLIPModel'\n"),
    "import fastcontrast as fc": "assert bool(loss.isfinite()) and set(out) >= {'loss'}\n",
}


def _block_id(code):
    return next((k for k in AFTER if k in code), code.split("\n")[0][:40])


@pytest.mark.parametrize("code", PY_BLOCKS, ids=[_block_id(c) for c in PY_BLOCKS])
def test_readme_python_blocks_run_verbatim(code, tmp_path):
    """Every ```python block of the README, verbatim, in a fresh interpreter of this venv (the one
    scripts/dev_env.sh --test builds), as a user pastes it: from another folder, without the test-suite's
    TRITON_INTERPRET; then the check of what it must have done."""
    from _thirdparty import missing

    needs = [m for m in ("open_clip", "transformers") if m in code]
    if needs and missing(*needs) is not None:
        pytest.skip(f"{missing(*needs)} is not installed (scripts/dev_env.sh --test installs it)")
    check = next((v for k, v in AFTER.items() if k in code), "")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code + "\n" + check], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"README block failed:\n{code}\n--- stderr ---\n{r.stderr[-4000:]}"
    if "integrations.open_clip" in code and missing("torchvision") is None:
        from _thirdparty import torchvision_shim

        torchvision_shim()
        import torchvision.extension

        if not torchvision.extension._has_ops():  # the CPU venv's torchvision: made importable, and said so once
            assert r.stderr.count("fastcontrast declared torchvision::nms/qnms") == 1, r.stderr[-2000:]


def test_readme_has_every_kind_of_block_checked():
    assert len(PY_BLOCKS) >= 2
    assert all(any(k in code for k in AFTER) for code in PY_BLOCKS), "a README python block has no check"


def test_readme_gives_test_time_and_the_quick_subset():
    assert "about 8 minutes on 2 CPU cores" in README
    quick = "bash scripts/dev_env.sh --test && .venv/bin/python -m pytest -q -m quick tests"
    assert quick in README
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"quick: ', pyproject), "pyproject.toml does not declare the quick marker"
    from conftest import QUICK_FILES

    assert QUICK_FILES and all((ROOT / "tests" / f).exists() for f in QUICK_FILES), QUICK_FILES


def test_readme_says_validate_runs_triton_through_the_interpreter():
    from fastcontrast.__main__ import INTERPRETER_NOTE

    assert "TRITON_INTERPRET=1" in INTERPRETER_NOTE
    assert "through the Triton interpreter" in README and "`TRITON_INTERPRET=0` skips" in README


def test_readme_and_docs_link_only_files_in_the_repository():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)\)", doc.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            assert (doc.parent / target).resolve().is_relative_to(ROOT), (doc.name, target)
            assert (doc.parent / target).exists(), (doc.name, target)


def test_readme_counts_its_families():
    assert "Four loss families from three papers, plus SigLIP" in README
    assert "../shared" not in README
