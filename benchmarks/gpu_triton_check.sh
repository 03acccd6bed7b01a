#!/usr/bin/env bash
# The GPU check of the Triton backend, in one device call. Two modes:
#
#   bash benchmarks/gpu_triton_check.sh final [OLD]
#       Under 9 minutes on an H100, installing nothing: the Triton backend's GPU tests (briefly), then the old
#       build (OLD) and this one interleaved in two rounds of `cortexflow bench` (median of ITERS calls with CUDA
#       graphs, real size, random weights): Pi0 at 1/2/3 views (prompt 20), Pi0.5 at 2 views (prompts 20 and 60),
#       OpenVLA-7B and RT-2 (prompt 26 ids); real-size `cortexflow verify` of Pi0, Pi0.5 and OpenVLA with this
#       build runs between the rounds.
#   bash benchmarks/gpu_triton_check.sh fp8
#       FP8 on this build only: the FP8 GPU tests (SKIP_TESTS), the expert layer (FP8_MICRO, FP8_TILINGS) and decode
#       GEMV (FP8_DECODE) micro-benchmarks with E4M3 weights, real-size `verify` of VERIFY_FP8 (pi0 openvla) and
#       `bench` of BENCH_MODELS (pi0,openvla; 2 views) for each TritonOptions.fp8 setting of FP8_STAGES (all), the
#       bench also without FP8. FP8_MICRO= / FP8_DECODE= (empty) leave those steps out.
#   bash benchmarks/gpu_triton_check.sh extra
#       every Triton GPU test file, then the kernel micro-benchmarks (attention, expert layer, encoder, decode
#       GEMV, its chain, and the decode GEMVs on persistent grids).
#
# OLD: a tarball of the old tree, made where the git history is (the device machine gets the working tree without
#   .git): `git archive -o old_build.tar 2fac96a`; or a commit, when git and the history are here. Default:
#   old_build.tar in the repository root when it exists, else commit 2fac96a. The old build is unpacked into a
#   temporary folder and run from there with its own package first on the path (checked: builds.json).
# Results in $OUT (default benchmarks/results/latest): summary.json and summary.txt (the A/B table, verify, tests,
#   every step's outcome) and results.tgz (every JSON and log of the run) -- 3 files, as the device tool returns 8.
# Environment: ITERS (timed calls per case, 100), BUDGET (seconds for the mode; a step that would start later is
#   left out and listed, 520), DEVICE / SIZE / BACKEND (cuda / real / triton; DEVICE=cpu SIZE=tiny BACKEND=pytorch
#   SKIP_TESTS=1 runs the plumbing on a CPU), SKIP_TESTS=1 (no GPU tests); for `final`: BUILDS (old new; fp8 adds
#   this build with --precision fp8, oldfp8 the old build with it, opt this build with --triton-options
#   "$OPT_OPTIONS", or with the bench arguments OPT_ARGS when set, e.g. "--token-embedding device"; optfp8 opt with
#   --precision fp8, opt2 this build with "$OPT2_OPTIONS"), GROUPS_TO_BENCH (pi0
#   pi05 token), ROUNDS (1 2; a device call may run one round), VERIFY (pi0 pi05 openvla) and VERIFY_FP8 (models verified with --precision fp8; none by default).
set -u
MODE="${1:-final}"
OLD="${2:-}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
ITERS="${ITERS:-100}"; BUDGET="${BUDGET:-520}"
DEVICE="${DEVICE:-cuda}"; SIZE="${SIZE:-real}"; BACKEND="${BACKEND:-triton}"
GRAPHS=on; [ "$DEVICE" = cpu ] && GRAPHS=off
OUT="${OUT:-benchmarks/results/latest}"; mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2
RUNS="$(mktemp -d)"; OLD_ROOT="$(mktemp -d)"
trap 'rm -rf "$RUNS" "$OLD_ROOT"' EXIT
START=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

case "$MODE" in final|extra|fp8) ;; *) echo "usage: bash benchmarks/gpu_triton_check.sh final [OLD] | extra | fp8 (got $MODE)"; exit 2 ;; esac
for arg in "$ITERS" "$BUDGET"; do
  case "$arg" in ''|*[!0-9]*) echo "ITERS and BUDGET must be whole numbers of calls / seconds, got '$arg'"; exit 2 ;; esac
done

# step LIMIT NAME CMD...: CMD (a program, run from STEP_DIR, default the repository root) with at most LIMIT seconds
# (fewer when the budget is nearly spent; left out when it is), its output in $RUNS/NAME.log, its outcome one line
# of $RUNS/steps.txt, its last lines shown.
step() {
  local limit=$1 name=$2 left rc t0
  shift 2
  left=$(( BUDGET - (SECONDS - START) ))
  if [ "$left" -lt 30 ]; then
    echo "left out $name (the ${BUDGET} s budget is spent)" | tee -a "$RUNS/steps.txt"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  t0=$SECONDS
  (cd "${STEP_DIR:-$ROOT}" && exec timeout "$limit" "$@") > "$RUNS/$name.log" 2>&1
  rc=$?
  if [ "$rc" -eq 0 ]; then
    echo "ok $name ($(( SECONDS - t0 )) s)" >> "$RUNS/steps.txt"
  elif [ "$rc" -eq 124 ]; then
    echo "timed out $name (limit $limit s)" >> "$RUNS/steps.txt"
  else
    echo "failed $name (rc $rc, $(( SECONDS - t0 )) s)" >> "$RUNS/steps.txt"
  fi
  echo "[$(( SECONDS - START )) s] $(tail -n 1 "$RUNS/steps.txt")"
  tail -n "${TAIL:-3}" "$RUNS/$name.log"
  return "$rc"
}

# cf_step LIMIT NAME ROOT ARGS...: a step running `python3 -m cortexflow.cli ARGS` from ROOT with ROOT's package
# first on the path.
cf_step() {
  local limit=$1 name=$2 root=$3
  shift 3
  STEP_DIR="$root" step "$limit" "$name" env PYTHONPATH="$root" python3 -m cortexflow.cli "$@"
}

# package_path ROOT: where `import cortexflow` resolves from ROOT (must be inside ROOT).
package_path() {
  (cd "$1" && PYTHONPATH="$1" python3 -c "import cortexflow, os; print(os.path.dirname(cortexflow.__file__))")
}

# verify_models PRECISION MODEL...: real-size verify of this build.
verify_models() {
  local precision=$1 model limit suffix=""
  shift
  [ "$precision" = fp8 ] && suffix=_fp8
  for model in "$@"; do
    limit=80; [ "$model" = openvla ] && limit=130
    cf_step "$limit" "verify_$model$suffix" "$ROOT" verify --model "$model" --backend "$BACKEND" --size "$SIZE" \
      --device "$DEVICE" --precision "$precision" --json "$RUNS/verify_$model$suffix.json"
  done
}

prepare_old() {
  local old="$OLD"
  if [ -z "$old" ]; then
    if [ -f old_build.tar ]; then old=old_build.tar; else old=2fac96a; fi
  fi
  if [ -f "$old" ]; then
    tar xf "$old" -C "$OLD_ROOT" || { echo "cannot unpack $old"; exit 2; }
  elif git rev-parse --verify -q "$old^{commit}" > /dev/null 2>&1; then
    git archive "$old" | tar x -C "$OLD_ROOT" || { echo "git archive $old failed"; exit 2; }
  else
    echo "OLD=$old is neither a file nor a commit here; make the tarball where the history is:"
    echo "  git archive -o old_build.tar $old   (then pass old_build.tar, or leave OLD out)"
    exit 2
  fi
  OLD_SOURCE="$old"
}

finish() {
  python3 benchmarks/ab_summary.py "$RUNS" "$OUT" | tee "$OUT/summary.txt"
  tar czf "$OUT/results.tgz" -C "$RUNS" . && echo "wrote $OUT/summary.json, summary.txt, results.tgz ($(( SECONDS - START )) s)"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import sys, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"
  python3 -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "no triton"
} | tee "$RUNS/machine.txt"
python3 -c "import typer, rich" || { echo "the CLI needs typer and rich in this Python"; exit 2; }

if [ "$MODE" = fp8 ]; then
  [ -z "${SKIP_TESTS:-}" ] && TAIL=3 step 150 gpu_tests python3 -m pytest -q -p no:cacheprovider tests/test_fp8.py \
    tests/test_precision.py tests/test_decode_gemv.py tests/test_expert_layer.py tests/test_triton_encoder.py \
    tests/test_expert_step.py tests/test_fp8_gemm.py tests/test_fp8_token_decoder.py -k "fp8 or FP8 or real_size or step"
  [ -n "${FP8_MICRO-1}" ] && TAIL=30 step 150 micro_expert_fp8 env OUT="$RUNS" python3 \
    benchmarks/micro_expert_layer.py --fp8 --no-phases --only "${FP8_TILINGS:-block_k 256}"
  [ -n "${FP8_DECODE-1}" ] && TAIL=30 step 150 bench_fp8_decode python3 benchmarks/bench_fp8_decode.py \
    --out "$RUNS/bench_fp8_decode.json"
  # FP8_STAGES: the TritonOptions.fp8 settings to verify and time (all, decoder, prefix, prefix+decoder).
  for stages in ${FP8_STAGES:-all}; do
    for model in ${VERIFY_FP8:-pi0 openvla}; do
      cf_step 130 "verify_${model}_fp8-${stages}" "$ROOT" verify --model "$model" --backend "$BACKEND" --size "$SIZE" \
        --device "$DEVICE" --triton-options "fp8=$stages" --json "$RUNS/verify_${model}_fp8-${stages}.json"
    done
  done
  # BENCH_OPTIONS: more --triton-options settings to time beside them (e.g. expert_launch=step,fp8=decoder).
  for options in default $(for st in ${FP8_STAGES:-all}; do echo "fp8=$st"; done) ${BENCH_OPTIONS:-}; do
    extra=(); build=new
    if [ "$options" != default ]; then
      extra=(--triton-options "$options"); build="$(echo "$options" | tr ',=' '+.' | tr -d '_')"
    fi
    cf_step 150 "bench_quick_${build}_r1" "$ROOT" bench --backends triton --graphs on --iters "$ITERS" --warmup 5 \
      "${extra[@]}" --models "${BENCH_MODELS:-pi0,openvla}" --views 2 --prompt-len "${BENCH_PROMPT:-20}" \
      --json "$RUNS/bench_quick_${build}_r1.json"
  done
  finish
  exit 0
fi

if [ "$MODE" = extra ]; then
  TAIL=3 step 420 gpu_tests python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py \
    tests/test_expert_layer.py tests/test_pdl.py tests/test_decode_gemv.py tests/test_triton_encoder.py \
    tests/test_openvla.py tests/test_rt2.py tests/test_token_tools.py
  for micro in micro_decoder_kernels micro_expert_layer micro_encoder micro_decode_gemv micro_decode_chain; do
    TAIL=12 step 150 "$micro" env OUT="$RUNS" python3 "benchmarks/$micro.py"
  done
  TAIL=12 step 150 micro_persistent_gemv python3 benchmarks/micro_persistent_gemv.py --out "$RUNS/micro_persistent_gemv.json"
  finish
  exit 0
fi

prepare_old
new_path="$(package_path "$ROOT")"; old_path="$(package_path "$OLD_ROOT")"
case "$new_path" in "$ROOT"/*) ;; *) echo "the new build imports cortexflow from $new_path, not $ROOT"; exit 2 ;; esac
case "$old_path" in "$OLD_ROOT"/*) ;; *) echo "the old build imports cortexflow from $old_path, not $OLD_ROOT"; exit 2 ;; esac
NEW_COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
cat > "$RUNS/builds.json" <<EOF
{"old": {"source": "$OLD_SOURCE", "package": "$old_path"},
 "new": {"commit": "$NEW_COMMIT", "package": "$new_path"},
 "iters": $ITERS, "device": "$DEVICE", "size": "$SIZE", "backend": "$BACKEND", "budget_s": $BUDGET}
EOF
echo "old build: $OLD_SOURCE ($old_path); new build: $NEW_COMMIT ($new_path)"

if [ -z "${SKIP_TESTS:-}" ]; then
  step 90 gpu_tests python3 -m pytest -q -p no:cacheprovider tests/test_pdl.py tests/test_expert_layer.py \
    tests/test_triton_kernels.py -k "pdl or real_size or end_to_end"
fi

BENCH=(bench --backends "$BACKEND" --graphs "$GRAPHS" --iters "$ITERS" --warmup 5 --device "$DEVICE" --size "$SIZE")
# bench_round ROUND BUILD...: each workload group on each build in the order given. Builds: old, new, fp8 (the
# new build with --precision fp8), oldfp8 (the old build with --precision fp8), opt (the new build with
# --triton-options "$OPT_OPTIONS"), optfp8 (opt with --precision fp8) and opt2 (--triton-options "$OPT2_OPTIONS").
bench_round() {
  local round=$1 group build root extra
  shift
  for group in $GROUPS_TO_BENCH; do
    for build in "$@"; do
      root="$ROOT"; case "$build" in old|oldfp8) root="$OLD_ROOT" ;; esac
      extra=(); case "$build" in *fp8) extra=(--precision fp8) ;; esac
      case "$build" in
        opt2) extra+=(--triton-options "$OPT2_OPTIONS") ;;
        opt*) if [ -n "${OPT_ARGS:-}" ]; then read -ra more <<< "$OPT_ARGS"; extra+=("${more[@]}")
              else extra+=(--triton-options "$OPT_OPTIONS"); fi ;;
      esac
      case "$group" in
        pi0) cf_step 150 "bench_pi0_${build}_r$round" "$root" "${BENCH[@]}" "${extra[@]}" --models pi0 \
               --views 1,2,3 --prompt-len 20 --json "$RUNS/bench_pi0_${build}_r$round.json" ;;
        pi05) cf_step 110 "bench_pi05_${build}_r$round" "$root" "${BENCH[@]}" "${extra[@]}" --models pi05 \
                --views 2 --prompt-len 20,60 --json "$RUNS/bench_pi05_${build}_r$round.json" ;;
        token) cf_step 150 "bench_token_${build}_r$round" "$root" "${BENCH[@]}" "${extra[@]}" --models openvla,rt2 \
                 --prompt-len 26 --json "$RUNS/bench_token_${build}_r$round.json" ;;
      esac
    done
  done
}

# BUILDS (old new; add fp8 for this build's --precision fp8), GROUPS_TO_BENCH (pi0 pi05 token), ROUNDS (1 2; round 2
# runs the builds in reverse order), VERIFY (pi0 pi05 openvla) and VERIFY_FP8 (none) choose what runs.
BUILDS="${BUILDS:-old new}"; GROUPS_TO_BENCH="${GROUPS_TO_BENCH:-pi0 pi05 token}"; ROUNDS="${ROUNDS:-1 2}"
VERIFY="${VERIFY-pi0 pi05 openvla}"; VERIFY_FP8="${VERIFY_FP8:-}"
REVERSED="$(echo "$BUILDS" | tr ' ' '\n' | tac | tr '\n' ' ')"
for round in $ROUNDS; do
  if [ "$round" = 1 ]; then
    # shellcheck disable=SC2086
    bench_round 1 $BUILDS
    # shellcheck disable=SC2086
    verify_models default $VERIFY
    # shellcheck disable=SC2086
    verify_models fp8 $VERIFY_FP8
  else
    # shellcheck disable=SC2086
    bench_round "$round" $REVERSED
  fi
done
finish
