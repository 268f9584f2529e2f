"""The versions pyproject.toml declares are the ones fastcontrast/_compat.py checks at import: an ImportError where
the package cannot work, a VersionWarning outside the tested ranges (and where Triton's interpreter is known to
fail), nothing inside them."""
import subprocess
import sys
import tomllib
from pathlib import Path

from fastcontrast import _compat
from fastcontrast._compat import version_problems

ROOT = Path(__file__).resolve().parents[1]
OK = dict(python="3.12.3", torch="2.11.0+cu130", triton="3.6.0", numpy="2.5.2", interpret=False)  # the GPU image


def test_pyproject_declares_what_is_checked():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {d.split(">=")[0]: d.split(">=")[1].split(";")[0].strip() for d in project["dependencies"]}
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(deps["torch"]) == _compat.MIN_TORCH
    assert as_tuple(deps["triton"]) == _compat.MIN_TRITON
    assert as_tuple(deps["numpy"]) == _compat.MIN_NUMPY
    assert as_tuple(project["requires-python"].lstrip(">=")) == _compat.MIN_PYTHON


def test_tested_versions_pass_silently():
    assert version_problems(**OK) == ([], [])
    assert version_problems(**dict(OK, torch="2.13.0+cpu", triton="3.9.0", numpy="2.4.6", python="3.11.7",
                                   interpret=True)) == ([], [])
    # CI's Triton 3.6.0 run: numpy 2.3.5 under the interpreter
    assert version_problems(**dict(OK, numpy="2.3.5", interpret=True)) == ([], [])


def test_outside_the_range_says_so():
    errors, _ = version_problems(**dict(OK, torch="2.3.1"))
    assert errors and "torch >= 2.4" in errors[0] and "custom_op" in errors[0]
    for key, value, words in (("torch", "2.9.1", "torch 2.9.1 is older than 2.11"),
                              ("triton", "3.5.1", "Triton 3.5.1 is older than 3.6"),
                              ("numpy", "2.2.6", "numpy 2.2.6 is older than 2.3"),
                              ("python", "3.10.14", "Python 3.10.14 is older than 3.11")):
        errors, warns = version_problems(**dict(OK, **{key: value}))
        assert not errors and len(warns) == 1 and words in warns[0], (key, warns)


def test_the_interpreter_numpy_trap_is_named():
    _, warns = version_problems(**dict(OK, numpy="2.4.6", interpret=True))
    assert len(warns) == 1 and "only 0-dimensional arrays" in warns[0] and "numpy < 2.4" in warns[0]
    assert version_problems(**dict(OK, numpy="2.4.6", interpret=False)) == ([], [])  # a GPU run: no interpreter
    assert version_problems(**dict(OK, triton="3.7.0", numpy="2.4.6", interpret=True)) == ([], [])


def test_import_with_an_old_torch_fails_clearly():
    code = "import torch; torch.__version__ = '2.3.1'; import fastcontrast"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "ImportError: fastcontrast needs torch >= 2.4" in r.stderr, r.stderr[-1500:]


def test_import_with_an_untested_torch_warns():
    code = ("import warnings, torch; torch.__version__ = '2.9.0'\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    import fastcontrast\n"
            "print([str(x.message) for x in w if x.category.__name__ == 'VersionWarning'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-1500:]
    assert "torch 2.9.0 is older than 2.11" in r.stdout
