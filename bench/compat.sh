#!/usr/bin/env bash
# make compat: the version matrix setup.py declares, checked in throwaway virtual environments.
# For each Triton version: compile every kernel configuration exactly as the JIT specialises it
# for sm_90a, and run the interpreter kernel tests (with the numpy that version's interpreter
# needs: numpy >= 2.4 breaks it before Triton 3.9). Versions: COMPAT_TRITON (default: the floor
# setup.py admits and 3.6.0, what torch 2.10/2.11 pin); the main .venv covers the newest.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSIONS=${COMPAT_TRITON:-"3.3.1 3.6.0"}
ROOT=${COMPAT_DIR:-.compat}
TESTS="tests/kernels/test_kernel_common.py tests/ops/test_rb_loss.py tests/ops/test_relaxed_embedding.py tests/kernels/test_sample_posterior_kernel.py tests/kernels/test_tails.py tests/ops/test_relaxed_adaptive.py"
status=0
for v in $VERSIONS; do
  venv="$ROOT/triton-$v"
  echo "== triton $v ($venv)"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip setuptools wheel
    "$venv/bin/pip" install -q torch==2.13.0
    "$venv/bin/pip" install -q "triton==$v" "numpy<2.4" scipy pytest
    DUO_FAST_SKIP_EXT=1 "$venv/bin/pip" install -q --no-deps --no-build-isolation -e .
  fi
  if env -u TRITON_INTERPRET DUO_FAST_NO_JIT=1 "$venv/bin/python" -m duo_fast.tools.compile_check --jobs 2 \
       > "$ROOT/compile-$v.log" 2>&1; then
    echo "compile: $(tail -n 1 "$ROOT/compile-$v.log")"
  else
    echo "compile FAILED (see $ROOT/compile-$v.log): $(tail -n 1 "$ROOT/compile-$v.log")"; status=1
  fi
  if DUO_FAST_NO_JIT=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider $TESTS > "$ROOT/tests-$v.log" 2>&1; then
    echo "interpreter tests: $(tail -n 1 "$ROOT/tests-$v.log")"
  else
    echo "interpreter tests FAILED (see $ROOT/tests-$v.log): $(tail -n 1 "$ROOT/tests-$v.log")"; status=1
  fi
done
exit $status
