#!/usr/bin/env bash
# Create, or reuse, ./.venv with fastcontrast installed (editable; the C++ extension built once and rebuilt only
# when csrc/, setup.py or pyproject.toml change). With --test it adds the test tools and the real third-party
# trainers the integration tests drive (open_clip, transformers, sentence-transformers), installed so that none of
# them pulls a second torch: the packages that depend on torch go in with --no-deps, the rest under a constraint
# pinning the torch already there. A torch already in .venv (e.g. a CUDA build on a GPU machine) is kept; else the
# CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
V=.venv/bin
[ -x "$V/python" ] || "${PYTHON:-python3}" -m venv .venv
pipq() { "$V/pip" install -q --disable-pip-version-check "$@"; }
"$V/python" -c "import torch" 2>/dev/null || pipq torch==2.13.0
"$V/python" -c "import setuptools, wheel, ninja, pybind11" 2>/dev/null || pipq setuptools wheel ninja pybind11

stamp() { cat "$@" 2>/dev/null | sha1sum | cut -d' ' -f1; }
build=$(stamp setup.py pyproject.toml csrc/*)
if [ "$(cat .venv/.fc-build 2>/dev/null)" != "$build" ] || ! "$V/python" -c "import fastcontrast" 2>/dev/null; then
  pipq --no-build-isolation -e . && echo "$build" > .venv/.fc-build
fi

if [ "${1:-}" = "--test" ]; then
  reqs=$(stamp tests/requirements-*.txt)
  if [ "$(cat .venv/.fc-test 2>/dev/null)" != "$reqs" ]; then
    torch_pin="torch==$("$V/python" -c 'import torch; print(torch.__version__)')"
    pipq --no-deps -r tests/requirements-torch-dependents.txt
    pipq -c <(echo "$torch_pin") -r tests/requirements-test.txt
    "$V/python" -c "import torch, sys; sys.exit(torch.__version__ != '${torch_pin#torch==}')" \
      || { echo "dev_env: the test requirements replaced torch" >&2; exit 1; }
    echo "$reqs" > .venv/.fc-test
  fi
fi
