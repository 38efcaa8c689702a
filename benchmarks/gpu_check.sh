#!/usr/bin/env bash
# Every GPU measurement this project needs, in one command of at most about 8 minutes:
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--budget SECONDS] [--dry-run]
#
#  1. set-up: the project on PYTHONPATH; any Python package the machine lacks installed from wheels in
#     a .whl/ folder, if you put one there (for machines without a package index), else a clear error;
#  2. bench.py on the article config, fp32 and bf16 with every peer (PyTorch eager, torch.compile, both
#     under autocast bf16; torch.compile dropped with a note if it does not compile within --compile-cap),
#     plus the train step with each depthwise formulation of ddpm_jax/depthwise.py forced;
#  3. profile_step.py: the fp32 train step's GPU time by kind of kernel;
#  4. the two bit-exact resume tests under XLA_FLAGS=--xla_gpu_deterministic_ops=true (a failure says by
#     how much the states differ);
#  5. the parity suite with JAX on the GPU.
#
# Each step has a time cap inside the budget (default 470 s) and a failed or cut step does not stop the
# next. Writes into --out (default docs/gpu): bench_gpu.{json,md,png}, profile_gpu.md, resume.log,
# parity.log, gpu_check.log and summary.md (what ran, how long, how it ended).
#
# --dry-run does the same on this machine's CPU at toy sizes (bench's tiny config in fp32 only, 1 round,
# torch.compile cut by a 1 s cap, no forced depthwise formulation, the resume tests only collected, one parity
# file), so that tests/test_gpu_check.py keeps the script working.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=docs/gpu
BUDGET=470
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (expected --out DIR, --budget SECONDS, --dry-run)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT" || { echo "gpu_check.sh: cannot create --out $OUT" >&2; exit 2; }
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/summary.md
: >"$LOG"
PY=${PYTHON:-python3}
START=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# One compilation cache for the run: bench.py's JAX peers compile their shared programs once and
# profile_step.py finds the fp32 step there. It starts empty, so bench.py's cold compiles are cold.
export DDPM_JAX_COMPILATION_CACHE
DDPM_JAX_COMPILATION_CACHE=$(mktemp -d /tmp/ddpm_gpu_check_xla.XXXXXX)
if [ "$DRY" = 1 ]; then  # toy sizes, fp32 only; the resume tests are only collected (the suite runs them)
  DEVICE=cpu; CONFIG=tiny; PRECISION=fp32; ROUNDS=1; CAP=1; DEPTHWISE=; SETUP=--no-parallel-setup
  PARITY=(parity_tests/test_schedules.py); RESUME=(--collect-only); TIMING=(--warmup 1 --turn-seconds 0 --sample-steps 2)
  # profile_step.py traces XLA:CPU under this flag; set for bench.py too, its step is compiled once for both
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_enable_xprof_traceme=true"
else
  DEVICE=gpu; CONFIG=article; PRECISION=both; ROUNDS=10; CAP=150; DEPTHWISE=shift,swap,taps; SETUP=--parallel-setup
  PARITY=(parity_tests); RESUME=(); TIMING=()
fi

{ echo "# gpu_check.sh$([ "$DRY" = 1 ] && echo ' --dry-run (CPU, toy sizes)')"; echo
  echo "| step | seconds | result |"; echo "|---|---|---|"; } >"$SUMMARY"

# step NAME CAP_SECONDS COMMAND...: runs COMMAND with its output in the log, capped by the time left.
step() {
  local name=$1 cap=$2; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 20 ]; then
    echo "| $name | 0 | not run: the budget of $BUDGET s is spent |" >>"$SUMMARY"; return 0
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "== $name (cap ${cap}s) $(date -u +%H:%M:%S)" | tee -a "$LOG"
  local t0=$SECONDS rc
  timeout --signal=INT --kill-after=10 "$cap" "$@" >>"$LOG" 2>&1
  rc=$?
  local result="ok"
  [ "$rc" = 124 ] && result="cut at its cap of ${cap} s"
  [ "$rc" != 0 ] && [ "$rc" != 124 ] && result="failed (exit $rc; see gpu_check.log)"
  echo "| $name | $((SECONDS - t0)) | $result |" >>"$SUMMARY"
  echo "   $result after $((SECONDS - t0)) s" | tee -a "$LOG"
}

# 1. Set-up.
NEEDED="jax flax optax orbax.checkpoint einops torch PIL tqdm numpy scipy pytest"
missing() { "$PY" - "$@" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}
lacking=$(missing $NEEDED)
if [ -n "$lacking" ] && ls .whl/*.whl >/dev/null 2>&1; then
  echo "installing from .whl/ for: $lacking" | tee -a "$LOG"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/ddpm_site .whl/*.whl >>"$LOG" 2>&1
  export PYTHONPATH=$PYTHONPATH:/tmp/ddpm_site
  lacking=$(missing $NEEDED)
fi
if [ -n "$lacking" ]; then
  echo "gpu_check.sh: $PY lacks $lacking; install them (e.g. pip install -e '.[cuda,test]'), or put their wheels in .whl/" | tee -a "$LOG" >&2
  echo "| set-up | $((SECONDS - START)) | failed: missing $lacking |" >>"$SUMMARY"; exit 1
fi
if [ "$DEVICE" = gpu ]; then
  if ! "$PY" -c "import jax, torch, sys; sys.exit(0 if jax.default_backend() == 'gpu' and torch.cuda.is_available() else 1)" >>"$LOG" 2>&1; then
    echo "gpu_check.sh: JAX or PyTorch sees no GPU here; use --dry-run on a CPU" | tee -a "$LOG" >&2
    echo "| set-up | $((SECONDS - START)) | failed: no GPU |" >>"$SUMMARY"; exit 1
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >>"$LOG" 2>&1
fi
"$PY" -c "import jax, flax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, jax.devices())" >>"$LOG" 2>&1
echo "| set-up | $((SECONDS - START)) | ok |" >>"$SUMMARY"

# 2. The interleaved benchmark, every peer, both precisions, and the depthwise formulations.
step "bench.py, $PRECISION, every peer" 300 \
  "$PY" benchmarks/bench.py --config "$CONFIG" --device "$DEVICE" --precision "$PRECISION" --rounds "$ROUNDS" "${TIMING[@]}" \
  --compile-cap "$CAP" "$SETUP" --jax-depthwise "$DEPTHWISE" --compilation-cache "$DDPM_JAX_COMPILATION_CACHE" \
  --json "$OUT/bench_gpu.json" --md "$OUT/bench_gpu.md" --png "$OUT/bench_gpu.png"

# 3. Where the fp32 step's time goes.
step "profile_step.py, fp32" 100 \
  "$PY" benchmarks/profile_step.py --config "$CONFIG" --out /tmp/ddpm_profile --md "$OUT/profile_gpu.md"

# 4. Bit-exact resume with XLA's deterministic GPU kernels.
step "resume tests, --xla_gpu_deterministic_ops" 90 env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true" \
  "$PY" -m pytest -q -p no:cacheprovider tests/test_training.py tests/test_training_configs.py \
  -k "bit_exact or extended_with_more_steps" --tb=short "${RESUME[@]}"
grep -E "passed|failed|differ|Error|tests? collected|test_training(_configs)?.py::" "$LOG" | tail -n 20 >"$OUT/resume.log"

# 5. The parity suite with JAX on the GPU (torch on the CPU), in parallel where pytest-xdist is there.
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && [ "$DRY" = 0 ] && XDIST=(-n 8 --dist worksteal)
step "parity suite" 120 "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" "${PARITY[@]}"
grep -E "passed|failed|tolerance|Error" "$LOG" | tail -n 40 >"$OUT/parity.log"

echo "" >>"$SUMMARY"
echo "Total $((SECONDS - START)) s of a $BUDGET s budget." >>"$SUMMARY"
for f in "$OUT/bench_gpu.md" "$OUT/profile_gpu.md"; do
  [ -f "$f" ] && { echo; cat "$f"; } >>"$SUMMARY"
done
cat "$SUMMARY"
