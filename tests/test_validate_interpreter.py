"""``python -m fastcontrast validate`` on a machine without CUDA runs the Triton rows through the Triton
interpreter by default (README), says so in one line, and keeps a TRITON_INTERPRET the user set."""
import os
import subprocess
import sys

import pytest
import torch

from fastcontrast.__main__ import INTERPRETER_NOTE

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter default is for CPU-only machines")


def _validate(env_value):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if env_value is not None:
        env["TRITON_INTERPRET"] = env_value
    r = subprocess.run([sys.executable, "-m", "fastcontrast", "validate", "--seeds", "1", "--dtype", "float32"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "| cpu " in line]
    triton = [line for line in rows if "| triton " in line]
    return r.stdout, triton


def test_triton_rows_run_through_the_interpreter_by_default():
    pytest.importorskip("triton")
    out, triton = _validate(None)
    assert out.splitlines()[0] == INTERPRETER_NOTE and out.count(INTERPRETER_NOTE) == 1
    assert triton and all("| pass" in line for line in triton), triton


def test_a_users_triton_interpret_is_kept():
    out, triton = _validate("0")
    assert INTERPRETER_NOTE not in out
    assert triton and all("| pass" not in line and "TRITON_INTERPRET" in line for line in triton), triton
