#!/usr/bin/env bash
# The trainers' own tests, from their published source distributions at the versions .venv pins
# (tests/requirements-torch-dependents.txt), each run twice in .venv: without fastcontrast's patch and with it.
# Every test must end the same way both times (same outcome per test id, so the same pass/skip/fail counts).
# Nothing of theirs is kept in this repository: the sdists are downloaded here, into a temporary folder.
#
#   open_clip (open-clip-torch): its sdist ships tests/. Run as open_clip's own CI runs its unit tests
#     (-m "not regression_test": the regression tests compare against data generated from a git revision, which
#     is not published), with fco.patch() applied before collection (.ci/upstream/fastcontrast_upstream.py),
#     less tests/test_training_simple.py: it trains RN50 / ViT-B-32 / CoCa at 224 px under CPU AMP, measured
#     here at ~4 min per step of 4 images (16 images an epoch, 5 tests: hours a run). The loss runs through the
#     trainer in tests/test_open_clip_integration.py instead (open_clip_train.main on a tiny model, patched and
#     not, same per-step losses). The rest never reach the loss and must simply end alike: many of them fail
#     here alike (hub downloads, no network; a webdataset newer than they expect).
#   transformers: its sdist ships tests/test_modeling_common.py and the other common mixins but not tests/models/
#     (so neither tests/models/clip/test_modeling_clip.py nor tests/models/siglip/test_modeling_siglip.py), nor
#     tests/exporters/ and tests/generation/ that test_modeling_common.py imports. The tag's archive on GitHub
#     would have them, and is tried; CI machines here reach only the package index, so there the step says so
#     and runs nothing for transformers. FASTCONTRAST_TRANSFORMERS_SRC=<a transformers source tree of the pinned
#     version> runs them from there (apply_fastcontrast_to_clip/siglip on the classes).
#
# Either way torchvision is made importable first (fastcontrast.integrations.ensure_torchvision_importable; the
# CPU venv's torchvision is a CUDA build), in both runs, so that the two runs differ by the patch alone.
# Time on the 2-core machine: ~1 min in all (measured 51 s: open_clip's suite ~20 s a run, the downloads ~10 s).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
PY=${PYTHON:-$root/.venv/bin/python}
work=$(mktemp -d /tmp/fastcontrast-upstream.XXXXXX)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
export PYTHONPATH="$root/.ci/upstream${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset TRITON_INTERPRET

version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
oc_v=$(version open-clip-torch)
tf_v=$(version transformers)
"$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: -d "$work/sdist" \
  "open-clip-torch==$oc_v" "transformers==$tf_v" >"$work/download.log" 2>&1 \
  || { grep -v "is ignored" "$work/download.log" | tail -5; echo "upstream: sdist download failed"; exit 1; }
for f in "$work"/sdist/*.tar.gz; do tar -xzf "$f" -C "$work"; done

# run_both NAME PATCH DIR PYTEST-ARGS...: pytest in DIR without the patch, then with PATCH, and compare
run_both() {
  local name=$1 patch=$2 dir=$3; shift 3
  for mode in none "$patch"; do
    (cd "$dir" && FASTCONTRAST_UPSTREAM_PATCH=$mode "$PY" -m pytest -q -p fastcontrast_upstream -p no:cacheprovider \
      -o addopts="" --junitxml="$work/$name-$mode.xml" "$@" >"$work/$name-$mode.log" 2>&1) || true
    grep -q "fastcontrast upstream run: patch = $mode" "$work/$name-$mode.log" \
      || { tail -30 "$work/$name-$mode.log"; echo "upstream: $name ($mode) did not run with the plugin"; exit 1; }
  done
  "$PY" "$root/.ci/upstream/compare_junit.py" "$name" "$work/$name-none.xml" "$work/$name-$patch.xml" \
    || { tail -40 "$work/$name-$patch.log"; exit 1; }
}

oc_src=$work/open_clip_torch-$oc_v
[ -d "$oc_src/tests" ] || { echo "upstream: open-clip-torch $oc_v's sdist has no tests/"; exit 1; }
run_both "open_clip-$oc_v" open_clip "$oc_src" tests -m "not regression_test" \
  --deselect tests/test_training_simple.py
if [ -n "${FASTCONTRAST_OPEN_CLIP_SRC:-}" ]; then  # e.g. a checkout of open_clip's main branch: its src/ and tests/
  PYTHONPATH="$FASTCONTRAST_OPEN_CLIP_SRC/src:$PYTHONPATH" run_both "open_clip-src" open_clip \
    "$FASTCONTRAST_OPEN_CLIP_SRC" tests -m "not regression_test" --deselect tests/test_training_simple.py \
    ${FASTCONTRAST_OPEN_CLIP_SRC_ARGS:-}
fi

tf_tests=${FASTCONTRAST_TRANSFORMERS_SRC:-$work/transformers-$tf_v}
if [ ! -f "$tf_tests/tests/models/clip/test_modeling_clip.py" ]; then
  if curl -fsSL --max-time 30 -o "$work/tf-tag.tar.gz" \
      "https://github.com/huggingface/transformers/archive/refs/tags/v$tf_v.tar.gz" 2>/dev/null; then
    tar -xzf "$work/tf-tag.tar.gz" -C "$work" && tf_tests=$work/transformers-$tf_v
  fi
fi
if [ -f "$tf_tests/tests/models/clip/test_modeling_clip.py" ]; then
  run_both "transformers-$tf_v" transformers "$tf_tests" \
    tests/models/clip/test_modeling_clip.py tests/models/siglip/test_modeling_siglip.py
else
  echo "upstream: transformers $tf_v: NOT RUN. Its sdist does not ship tests/models/ (test_modeling_clip.py," \
    "test_modeling_siglip.py) and GitHub's v$tf_v archive is unreachable from here; set" \
    "FASTCONTRAST_TRANSFORMERS_SRC to a source tree of v$tf_v to run them (tests/test_transformers_integration.py" \
    "compares the patched and unpatched models instead)."
fi
echo "upstream: done in $(( $(date +%s) - start )) s"
