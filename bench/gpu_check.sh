#!/usr/bin/env bash
# One-shot GPU validation for vlmkernels (issue 2 item 11, issue 6).
#
#   bash bench/gpu_check.sh [OUT_DIR] [--dry-run] [--build]
#
# On a GPU machine (torch/triton/transformers preinstalled, no internet) it
#   1. records the machine (nvidia-smi, versions),
#   2. builds vlmkernels._C in place for the local GPU arch (--no-build-isolation semantics: the
#      preinstalled torch is used; setup.py picks the visible GPU's compute capability),
#   3. runs `python -m vlmkernels`,
#   4. runs the CUDA tests: `pytest -m cuda` plus every device-parametrized op test on CUDA,
#   5. runs the quick bench (`python -m bench`) with a time limit,
# each stage under its own timeout, all in under 8 minutes. Logs, the results CSV, the README table
# and a tarball of the plots go to OUT_DIR (default $OUT, else /tmp/vlmk_gpu_check_out): 8 files
# (summary.txt, env.txt, build.log, pytest.log, bench.log, <device>_<time>.csv, table.md, plots.tgz),
# no sub-folders, so everything comes back from a lent machine.
#
# Results are stamped with the git commit; where the tree has no .git (a copy sent to a lent
# machine), run it as `VLMKERNELS_COMMIT=<sha> bash bench/gpu_check.sh`.
#
# Without a GPU (or with --dry-run) it does a reduced run of the same stages: no build unless
# --build is given (it then takes the shared build lock), CUDA tests collected and skipped, and a
# one-op bench. This is how the script is tested on CPU-only machines.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR=""
DRY=0
FORCE_BUILD=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --build) FORCE_BUILD=1 ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | grep '^#' | cut -c3-; exit 0 ;;
    *) OUT_DIR="$arg" ;;
  esac
done
OUT_DIR="${OUT_DIR:-${OUT:-${TMPDIR:-/tmp}/vlmk_gpu_check_out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/vlmk_gpu_check.XXXXXX")"
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"
cd "$ROOT"

# The interpreter: $PYTHON if given, else the repo's .venv when it has torch, else python3.
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ] && "$ROOT/.venv/bin/python" -c "import torch" 2>/dev/null; then PY="$ROOT/.venv/bin/python"
else PY="python3"; fi

HAS_GPU=0
if [ "$DRY" = 0 ] && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  HAS_GPU=1
fi
MODE=$([ "$HAS_GPU" = 1 ] && echo "gpu" || echo "dry-run (no GPU or --dry-run): reduced stages")
START=$(date +%s)
FAILED=0

note() { echo "$*" | tee -a "$SUMMARY"; }

# stage NAME SECONDS LOGFILE CMD...: run with a timeout, log to LOGFILE, record status and duration
stage() {
  local name="$1" limit="$2" log="$3"; shift 3
  local t0=$(date +%s) rc
  echo "== $name (limit ${limit}s): $*" >>"$log"
  timeout --kill-after=15 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc = 0 ]; then note "[ok]      $name (${dt}s)"
  elif [ $rc = 124 ] || [ $rc = 137 ]; then note "[timeout] $name after ${dt}s (limit ${limit}s; see $(basename "$log"))"; FAILED=1
  else note "[fail]    $name rc=$rc (${dt}s; see $(basename "$log"))"; FAILED=1; fi
  return $rc
}

note "vlmkernels gpu_check: $MODE"
COMMIT="${VLMKERNELS_COMMIT:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
note "started $(date -u +%Y-%m-%dT%H:%M:%SZ) in $ROOT, commit $COMMIT, python $PY"

# 1. machine
{
  echo "== nvidia-smi"; (command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi) || echo "no nvidia-smi"
  echo "== nvcc"; (command -v nvcc >/dev/null && nvcc --version | tail -2) || echo "no nvcc on PATH"
  echo "== versions"
  timeout 60 "$PY" - <<'PYEOF'
import importlib, platform
print("python", platform.python_version())
for m in ("torch", "triton", "transformers", "torchvision", "numpy", "PIL", "pytest", "pytest_benchmark", "matplotlib"):
    try:
        print(f"{m:<16} {importlib.import_module(m).__version__}")
    except Exception as e:
        print(f"{m:<16} missing ({type(e).__name__})")
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.0f} GiB", f"{p.multi_processor_count} SMs")
PYEOF
} >"$OUT_DIR/env.txt" 2>&1

# 2. build (in place: the repo root becomes importable, like `make build`)
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}"
if [ "$HAS_GPU" = 1 ]; then
  unset TORCH_CUDA_ARCH_LIST  # setup.py then targets the visible GPU's arch
  export VLMKERNELS_FORCE_CUDA=1
  # the documented install (editable, so the repo root stays importable); in-place build_ext if the
  # machine's pip/setuptools cannot do an editable install
  stage "pip install --no-build-isolation -e . (local GPU arch)" 240 "$OUT_DIR/build.log" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -e "$ROOT"
  BUILD_RC=$?
  if [ $BUILD_RC != 0 ]; then
    stage "fallback: setup.py build_ext --inplace" 200 "$OUT_DIR/build.log" "$PY" setup.py build_ext --inplace
    BUILD_RC=$?
    [ $BUILD_RC = 0 ] && FAILED=0  # the build stage is the first that can fail
  fi
elif [ "$FORCE_BUILD" = 1 ]; then
  export MAX_JOBS=1
  stage "build _C (dry run, shared lock)" 900 "$OUT_DIR/build.log" flock /tmp/vlmk_build.lock "$PY" setup.py -q build_ext --inplace
  BUILD_RC=$?
else
  echo "dry run: build skipped (pass --build to run: $PY setup.py build_ext --inplace)" >"$OUT_DIR/build.log"
  note "[skip]    build (dry run; --build to include it)"
  BUILD_RC=0
fi

# 3. what was built
stage "python -m vlmkernels" 40 "$OUT_DIR/env.txt" "$PY" -m vlmkernels

# 4. CUDA tests: the cuda-marked ones and every device-parametrized test's [cuda] case (-k matches
# marker names and test ids); the build tests are left out (they rebuild the extension).
# TRITON_INTERPRET=0: conftest defaults it to 1, which would interpret Triton kernels on the GPU.
if [ "$HAS_GPU" = 1 ]; then
  if [ "$BUILD_RC" = 0 ]; then
    export TRITON_INTERPRET=0
    # what the build left of the 450 s budget, less the bench's 140 s: first Triton compiles are slow
    PYTEST_LIMIT=$(( 450 - ($(date +%s) - START) - 140 ))
    [ "$PYTEST_LIMIT" -lt 90 ] && PYTEST_LIMIT=90
    stage "pytest -k cuda (marked + [cuda] ids)" "$PYTEST_LIMIT" "$OUT_DIR/pytest.log" \
      "$PY" -m pytest -q -rs --no-header -p no:cacheprovider -k "cuda and not build" tests
  else
    note "[skip]    pytest (build failed)"
  fi
else
  stage "pytest -m cuda (collected, skipped on CPU)" 240 "$OUT_DIR/pytest.log" \
    "$PY" -m pytest -q -rs --no-header -p no:cacheprovider -m cuda tests
fi

# 5. quick bench, stopped from starting new cases in time to write its CSV and plots
if [ "$HAS_GPU" = 1 ]; then
  BENCH_ARGS=(--time-limit 95)
  BENCH_LIMIT=140
else
  BENCH_ARGS=(--family moe --op moe_topk_route --budget 0.05 --time-limit 60)
  BENCH_LIMIT=400
fi
stage "python -m bench (quick)" "$BENCH_LIMIT" "$OUT_DIR/bench.log" \
  "$PY" -m bench --out "$WORK/results" --no-readme "${BENCH_ARGS[@]}"

CSV="$(ls -t "$WORK"/results/*.csv 2>/dev/null | head -1)"
if [ -n "$CSV" ]; then
  cp "$CSV" "$OUT_DIR/$(basename "$CSV")"
  "$PY" -m bench.report --results "$WORK/results" --print >"$OUT_DIR/table.md" 2>>"$OUT_DIR/bench.log"
  if ls "$WORK"/results/*.png >/dev/null 2>&1; then
    tar -C "$WORK/results" -czf "$OUT_DIR/plots.tgz" $(cd "$WORK/results" && ls *.png)
  fi
  note "results: $(basename "$CSV") ($(($(wc -l <"$CSV") - 1)) rows), table.md, plots.tgz"
  note "to publish: copy the CSV into bench/results/, untar plots.tgz there, run python -m bench.report"
else
  note "no results CSV was written (see bench.log)"
  FAILED=1
fi

rm -rf "$WORK"
note "finished in $(( $(date +%s) - START ))s; $([ $FAILED = 0 ] && echo 'all stages passed' || echo 'SOME STAGES FAILED')"
exit $FAILED
