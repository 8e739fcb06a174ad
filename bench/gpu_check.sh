#!/usr/bin/env bash
# One command for a GPU machine: build the C++/CUDA extension, compile every Triton kernel for
# this GPU, run the kernel tests on CUDA (not the interpreter), run `duo-fast bench all --preset
# small` and the per-issue benches at the issues' GPU shapes, and collect everything in one JSON
# file plus a short table.
#
#   bench/gpu_check.sh [--dry-run] [--out DIR] [--quick]
#
# --dry-run  check the prerequisites and print every step without running it
# --quick    skip the whole-suite pytest run (kernel tests and benches only)
# Needs: python with torch (CUDA build), triton, numba, scipy. No network: wheels in the ignored
# folder .whl/ (if present) are installed with --no-index; deepspeed is optional (its steps are
# skipped with the reason when it is missing). Environment: PYTHON (default python3), STEP_TIMEOUT
# (seconds per step, default 900).
set -u -o pipefail

DRY=0
QUICK=0
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/gpu_check_out"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --quick) QUICK=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
PY="${PYTHON:-python3}"
STEP_TIMEOUT="${STEP_TIMEOUT:-900}"
cd "$ROOT" || exit 2
unset TRITON_INTERPRET

# ---------------------------------------------------------------- prerequisites
MISSING=()
SKIPS=()
check() {  # check NAME required|optional COMMAND...
  local name="$1" need="$2"; shift 2
  if out="$("$@" 2>&1)"; then
    printf '  ok       %-10s %s\n' "$name" "$(echo "$out" | tail -1)"
  elif [ "$need" = required ]; then
    printf '  MISSING  %-10s %s\n' "$name" "$(echo "$out" | tail -1)"
    MISSING+=("$name")
  else
    printf '  absent   %-10s %s (optional: its steps are skipped)\n' "$name" "$(echo "$out" | tail -1)"
    SKIPS+=("$name")
  fi
}
echo "gpu_check: prerequisites"
check python required "$PY" -c "import sys; print(sys.version.split()[0])"
check torch required "$PY" -c "import torch; print(torch.__version__, 'cuda', torch.version.cuda)"
check cuda required "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print(torch.cuda.get_device_name(0), 'sm_%d%d' % torch.cuda.get_device_capability(0))"
check triton required "$PY" -c "import triton; print(triton.__version__)"
check numba required "$PY" -c "import numba; print(numba.__version__)"
check scipy required "$PY" -c "import scipy; print(scipy.__version__)"
check pytest required "$PY" -c "import pytest; print(pytest.__version__)"
check nvcc optional nvcc --version
check deepspeed optional "$PY" -c "import deepspeed; print(deepspeed.__version__)"
check wheels optional bash -c "ls .whl/*.whl >/dev/null 2>&1 && echo \"\$(ls .whl/*.whl | wc -l) wheels in .whl/\" || { echo 'no .whl/ folder'; exit 1; }"

# ---------------------------------------------------------------- steps
STEPS=()
add() { STEPS+=("$1|$2"); }   # add NAME "COMMAND"
add wheels      "ls .whl/*.whl >/dev/null 2>&1 && $PY -m pip install --no-index --no-deps .whl/*.whl || echo 'no wheels to install'"
add build_ext   "$PY -m pip install --no-index --no-build-isolation --no-deps -e . || $PY setup.py build_ext --inplace"
add compile     "$PY -m duo_fast.tools.compile_check --arch \$($PY -c 'import torch; a, b = torch.cuda.get_device_capability(0); print(a * 10 + b)') --jobs 8 --json $OUT/compile.json"
add kernel_tests "$PY -m pytest -q -p no:cacheprovider tests/ops/test_rb_loss.py tests/ops/test_relaxed_embedding.py tests/kernels/test_sample_posterior_kernel.py tests/ops/test_posterior.py tests/ops/test_ttable_op.py tests/sampling/test_sampling.py --junitxml $OUT/kernel_tests.xml"
if [ $QUICK = 0 ]; then
  add all_tests "$PY -m pytest -q -p no:cacheprovider tests --junitxml $OUT/all_tests.xml"
fi
add bench_suite "$PY -m duo_fast.cli bench all --preset small --no-progress --json $OUT/bench_small.json"
add bench_rb_loss "$PY bench/bench_rb_loss.py --device cuda --tokens 32768 --vocab 50257 --dim 768 --dtype bf16 --json $OUT/bench_rb_loss.json"
add bench_relaxed "$PY bench/bench_relaxed.py --device cuda --batch 32 --length 1024 --vocab 50257 --dim 768 --dtype bf16 --json $OUT/bench_relaxed.json"
add bench_sample "$PY bench/bench_sample.py --device cuda --batch 16 --length 1024 --vocab 50257 --steps 8 --preset small --json $OUT/bench_sample.json"
add bench_ttable "$PY bench/bench_ttable.py --device cuda --n 10000000 --json $OUT/bench_ttable.json"
if [ ${#SKIPS[@]} -eq 0 ] || [[ ! " ${SKIPS[*]} " =~ " deepspeed " ]]; then
  # issue #7: the small model at L = 1024 under ZeRO-2 on one GPU, curriculum then discrete (bundled corpus and
  # tokenizer: no network here, so K = 4096, not 50257; the suite's train group has the K = 50257 step)
  add train_zero2 "$PY -m torch.distributed.run --nproc_per_node 1 -m duo_fast.cli train --model small --dataset bundled --tokenizer bundled --tokenizer-vocab 4096 --length 1024 --batch-size 16 --micro-batch-size 8 --zero-stage 2 --steps 40 --curriculum-end 20 --warmup-steps 10 --ema 0.999 --val-batches 2 --log-every 5 --progress false --out $OUT/train_zero2"
else
  echo "gpu_check: deepspeed is not installed: skipping train_zero2 (ZeRO-2 training figures of #7)"
fi

if [ $DRY = 1 ]; then
  echo "gpu_check: dry run; results would go to $OUT; steps (each under timeout ${STEP_TIMEOUT}s):"
  for s in "${STEPS[@]}"; do printf '  %-14s %s\n' "${s%%|*}" "${s#*|}"; done
  if [ ${#MISSING[@]} -gt 0 ]; then
    echo "gpu_check: on this machine the run would stop: missing ${MISSING[*]}"
  else
    echo "gpu_check: prerequisites satisfied"
  fi
  exit 0
fi
if [ ${#MISSING[@]} -gt 0 ]; then
  echo "gpu_check: missing prerequisites: ${MISSING[*]}" >&2
  exit 1
fi

mkdir -p "$OUT"
: > "$OUT/steps.tsv"
for s in "${STEPS[@]}"; do
  name="${s%%|*}"; cmd="${s#*|}"
  echo "== $name: $cmd"
  t0=$(date +%s)
  timeout "$STEP_TIMEOUT" bash -c "$cmd" > "$OUT/$name.log" 2>&1
  rc=$?
  t1=$(date +%s)
  tail -5 "$OUT/$name.log"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((t1 - t0))" >> "$OUT/steps.tsv"
done

"$PY" - "$OUT" <<'EOF'
import json, os, subprocess, sys, datetime
import torch
out = sys.argv[1]
steps = [l.split("\t") for l in open(os.path.join(out, "steps.tsv")).read().splitlines()]
res = {"device": torch.cuda.get_device_name(0), "capability": torch.cuda.get_device_capability(0),
       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
       "dirty": bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip()),
       "torch": torch.__version__, "steps": [{"name": n, "rc": int(rc), "seconds": int(s)} for n, rc, s in steps]}
for f in sorted(os.listdir(out)):
    if f.endswith(".json") and f != "gpu_check.json":
        try:
            res[f[:-5]] = json.load(open(os.path.join(out, f)))
        except ValueError:
            res[f[:-5]] = "unreadable"
json.dump(res, open(os.path.join(out, "gpu_check.json"), "w"), indent=2)
print(f"\ngpu_check on {res['device']} at {res['commit'][:10]}{' (dirty)' if res['dirty'] else ''}, {res['date']}")
for s in res["steps"]:
    print(f"  {s['name']:14s} {'ok' if s['rc'] == 0 else 'FAILED rc=%d' % s['rc']:>12s} {s['seconds']:>5d} s")
suite = res.get("bench_small")
if isinstance(suite, dict):
    for r in suite["rows"]:
        print(f"  {r['case'][:60]:60s} ref {r['ref_ms']:9.2f} ms ours {r['ours_ms']:9.2f} ms "
              f"x{r['speedup']:6.2f} mem {r['mem_ratio'] if r['mem_ratio'] is None else round(r['mem_ratio'], 3)} "
              f"{'ok' if r['match'] else 'MISMATCH'}")
print(f"wrote {os.path.join(out, 'gpu_check.json')}")
sys.exit(1 if any(s["rc"] for s in res["steps"]) else 0)
EOF
