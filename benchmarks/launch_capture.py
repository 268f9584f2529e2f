"""pytest plugin: the Triton launches of the GPU session's test files, for the static kernel report.

CI loads it into its test run (``PYTEST_ADDOPTS="-p benchmarks.launch_capture"`` from the repository's root) with
``FASTCONTRAST_LAUNCHES_OUT=FILE``; every launch of a fastcontrast kernel made by a test of
``fastcontrast.aot.SESSION_TESTS`` (the files the session's ``tests`` step runs on the GPU) is recorded as the
static report records its own (:func:`fastcontrast.aot.launch_record`: types, constexprs, 16-divisible arguments,
the launch-table variant in effect), tagged ``tests/<file>``, and FILE is written when the run ends. Then
``python -m fastcontrast aot --add-launches FILE`` builds them. Nothing is imported before pytest has loaded the
test suite's conftest (which sets TRITON_INTERPRET=1 on a machine without a GPU before fastcontrast is imported).
"""
from __future__ import annotations

import json
import os

_SEEN: dict = {}
_TAG = {"tag": None}


def pytest_configure(config):
    if not os.environ.get("FASTCONTRAST_LAUNCHES_OUT"):
        return
    from fastcontrast.aot import install_launch_hook, record_key

    def sink(rec):
        if _TAG["tag"] is None or not rec["module"].startswith("fastcontrast"):
            return
        r = _SEEN.setdefault(record_key(rec), dict(rec, workloads=[]))
        if _TAG["tag"] not in r["workloads"]:
            r["workloads"].append(_TAG["tag"])

    config._fastcontrast_unhook = install_launch_hook(sink)


def pytest_runtest_setup(item):
    from fastcontrast.aot import SESSION_TESTS

    name = os.path.basename(str(getattr(item, "path", None) or item.fspath))
    _TAG["tag"] = f"tests/{name}" if any(t.endswith("/" + name) for t in SESSION_TESTS) else None


def pytest_unconfigure(config):
    out = os.environ.get("FASTCONTRAST_LAUNCHES_OUT")
    if not out:
        return
    unhook = getattr(config, "_fastcontrast_unhook", None)
    if unhook is not None:
        unhook()
    with open(out, "w") as f:
        json.dump(list(_SEEN.values()), f)
