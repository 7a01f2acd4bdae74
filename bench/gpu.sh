#!/usr/bin/env bash
# Checks a CUDA machine in under 8 minutes: the tests on the GPU, harvest and training speed in bf16 against
# the GPU's peak, and data-parallel training over NCCL where there are two GPUs or more. Writes a Markdown
# report (printing it as it goes) and exits non-zero if any step failed.
#
#   bash bench/gpu.sh                             # report in runs/gpu-report.md, logs in runs/gpu-report.logs/
#   bash bench/gpu.sh runs/h100.md                # report elsewhere
#   bash bench/gpu.sh --dry-run [REPORT]          # every step on the CPU at tiny sizes (one test file), in a
#   SAE_GPU_CHECK_DEVICE=cpu bash bench/gpu.sh    #   few minutes: checks this script (time limits, report, exit
#                                                 #   status) and measures nothing about a GPU
#
# Steps, each with its own time limit (then `timeout` stops it, and kills it 5 s later). A step that fails or
# runs out of time is reported as FAILED with the end of its log, and the next step runs.
#   machine   20 s  GPUs, their memory, driver, torch/CUDA/NCCL versions, the git commit (bench/gpu.py)
#   tests    150 s  SAE_TEST_DEVICE=cuda pytest -m "not slow" on the test files whose tests take the device
#   harvest   80 s  bench/harvest.py: SmolLM2-135M in bf16, batches of 256 contexts; tokens/s, share of peak
#   train    110 s  bench/train_speed.py: our TopK SAE (18432 latents, batches of 4096) in bf16 and fp32
#   ddp       90 s  bench/ddp.py: train.py under torchrun over every GPU (NCCL), ranks compared; with one GPU
#                   it is not checked, and the report says so
# The limits add up to 450 s, 475 s with the kill grace: under 8 minutes. SAE_GPU_CHECK_BUDGET (seconds, default
# 450) caps them together: a step gets at most what is left. PYTHON names the interpreter (default: .venv's
# where it exists, else python3).
set -uo pipefail

DEVICE=${SAE_GPU_CHECK_DEVICE:-cuda}
REPORT=""
for arg in "$@"; do
  case $arg in
    --dry-run) DEVICE=cpu ;;
    -h | --help)
      sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    -*)
      echo "bench/gpu.sh: unknown option $arg (see --help)" >&2
      exit 2
      ;;
    *) REPORT=$arg ;;
  esac
done
[[ -n $REPORT && $REPORT != /* ]] && REPORT=$PWD/$REPORT # a report named here lands here
cd "$(dirname "$0")/.." || exit 2
REPORT=${REPORT:-runs/gpu-report.md}
case $DEVICE in
  cuda | cpu) ;;
  *)
    echo "bench/gpu.sh: SAE_GPU_CHECK_DEVICE=$DEVICE must be cuda or cpu (a dry run)" >&2
    exit 2
    ;;
esac
BUDGET=${SAE_GPU_CHECK_BUDGET:-450}
if ! [[ $BUDGET =~ ^[0-9]+$ ]]; then
  echo "bench/gpu.sh: SAE_GPU_CHECK_BUDGET=$BUDGET must be a whole number of seconds" >&2
  exit 2
fi
if ! command -v timeout >/dev/null; then
  echo "bench/gpu.sh: needs \`timeout\` (GNU coreutils)" >&2
  exit 2
fi
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" # bench/*.py import sae without an installed package
export WANDB_SILENT=true HYDRA_FULL_ERROR=1 PYTHONUNBUFFERED=1 # a step stopped at its limit leaves its output

LOGS=${REPORT%.md}.logs
mkdir -p "$(dirname "$REPORT")" "$LOGS" || exit 2
: >"$REPORT"
KILL_GRACE=5
DEADLINE=$((SECONDS + BUDGET))
NAMES=() RESULTS=() WALLS=() LIMITS=()
FAILED=0

say() { printf '%s\n' "$@" | tee -a "$REPORT"; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# run_step NAME LIMIT COMMAND...: COMMAND under `timeout`, at most LIMIT seconds and no more than the budget
# has left; its output to $LOGS/NAME.out, its errors to $LOGS/NAME.err. Sets STEP_RC, STEP_WALL, STEP_LIMIT.
run_step() {
  local name=$1 limit=$2 t0
  shift 2
  local left=$((DEADLINE - SECONDS))
  ((limit > left)) && limit=$left
  STEP_LIMIT=$limit STEP_WALL=0.0
  { printf '$'; printf ' %q' "$@"; echo; } >"$LOGS/$name.cmd"
  if ((limit < 1)); then
    STEP_LIMIT=0 STEP_RC=-1 # not run
    echo "not run: the $BUDGET s budget was spent" >"$LOGS/$name.err"
    : >"$LOGS/$name.out"
    return
  fi
  t0=$(now)
  timeout --kill-after="$KILL_GRACE" "$limit" "$@" >"$LOGS/$name.out" 2>"$LOGS/$name.err"
  STEP_RC=$?
  STEP_WALL=$(elapsed "$t0")
}

# The end of a step's output and errors, progress bars left out.
log_tail() {
  if [[ -s $LOGS/$1.out || -s $LOGS/$1.err ]]; then
    cat "$LOGS/$1.out" "$LOGS/$1.err" | tr '\r' '\n' | grep -v -E '[0-9]+%\|' | tail -n "${2:-40}"
  else
    echo "(it printed nothing)"
  fi
}

# report_step NAME [RESULT [DETAIL]]: the step's heading, result and command in the report, and its row in the
# summary. RESULT defaults to ok / FAILED from STEP_RC; DETAIL follows it (e.g. the test counts). A FAILED step
# shows the end of its log.
report_step() {
  local name=$1 result=${2:-} detail=${3:-}
  if [[ -z $result ]]; then
    case $STEP_RC in
      0) result=ok ;;
      -1) result="FAILED (not run: the $BUDGET s budget was spent)" ;;
      124 | 137) result="FAILED (stopped at its limit, $STEP_LIMIT s)" ;;
      *) result="FAILED (exit status $STEP_RC)" ;;
    esac
  fi
  [[ $result == FAILED* ]] && FAILED=1
  result+=${detail:+: $detail}
  NAMES+=("$name") RESULTS+=("$result") WALLS+=("$STEP_WALL") LIMITS+=("$STEP_LIMIT")
  say "" "## $name: $result ($STEP_WALL s, limit $STEP_LIMIT s)" "" '```text' "$(cat "$LOGS/$name.cmd")" '```'
  if [[ $result == FAILED* ]]; then
    say "" "End of its log ($LOGS/$name.out, $LOGS/$name.err):" "" '```text' "$(log_tail "$name")" '```'
  fi
}

# A step's output in the report (from its first line matching the pattern $2, if given).
report_output() {
  local from=1
  [[ -n ${2:-} ]] && from="/$2/"
  say "" '```text' "$(tr '\r' '\n' <"$LOGS/$1.out" | grep -v -E '[0-9]+%\|' | sed -n "$from,\$p")" '```'
}

say "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')" ""
if [[ $DEVICE == cpu ]]; then
  say "Dry run: every step on the CPU at tiny sizes. It checks this script (time limits, report, exit" \
    "status); no figure below says anything about a GPU. Logs: $LOGS/"
else
  say "Every step on CUDA, within $BUDGET s. Logs: $LOGS/"
fi

# --- the machine -------------------------------------------------------------------------------------------
run_step machine 20 "$PYTHON" bench/gpu.py --count-file "$LOGS/gpus"
GPUS=$(cat "$LOGS/gpus" 2>/dev/null || echo 0)
say "" "## Machine" "" "$(cat "$LOGS/machine.out")"
if ((STEP_RC == 0)) && [[ $DEVICE == cuda ]] && ((GPUS == 0)); then
  echo "CUDA is not available to torch: nothing here can run on a GPU" >>"$LOGS/machine.err"
  report_step machine "FAILED (no CUDA device)"
else
  report_step machine
fi

# --- the tests on the device ---------------------------------------------------------------------------------
# The test files whose tests take the `device` fixture; a dry run takes the quickest of them alone.
TEST_FILES=(tests/test_model.py tests/test_train.py tests/test_archs.py tests/test_harvest.py)
[[ $DEVICE == cpu ]] && TEST_FILES=(tests/test_model.py)
run_step tests 150 env SAE_TEST_DEVICE="$DEVICE" "$PYTHON" -m pytest -q -rfE -m "not slow" "${TEST_FILES[@]}"
COUNTS=$(grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected)' "$LOGS/tests.out" | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')
report_step tests "" "${COUNTS:-pytest printed no counts}"
if grep -q -E '^(FAILED|ERROR) ' "$LOGS/tests.out"; then
  say "" '```text' "$(grep -E '^(FAILED|ERROR) ' "$LOGS/tests.out")" '```'
fi

# --- harvest and training speed ------------------------------------------------------------------------------
if [[ $DEVICE == cuda ]]; then
  HARVEST=(model.device=cuda model.dtype=bfloat16 model.batch_size=256 --batches 8)
  TRAIN=(--device cuda --peers none --batch-size 4096 --expansion 32 --steps 500)
else
  HARVEST=(model.name=tiny model.layer=2 model.device=cpu model.dtype=bfloat16 model.batch_size=4 --batches 2)
  TRAIN=(--model tiny --layer 2 --device cpu --train-tokens 8192 --test-tokens 2048 --expansion 4 --k 8
    --batch-size 256 --steps 20 --quality-tokens 10240 --peers none --threads 1)
fi
run_step harvest 80 "$PYTHON" bench/harvest.py "${HARVEST[@]}"
report_step harvest
((STEP_RC == 0)) && report_output harvest

run_step train 110 "$PYTHON" bench/train_speed.py "${TRAIN[@]}"
report_step train
((STEP_RC == 0)) && report_output train

# --- data-parallel training ----------------------------------------------------------------------------------
if [[ $DEVICE == cpu ]]; then
  # Two CPU processes with gloo stand in for two GPUs: the same launch, run directory and rank comparison.
  run_step ddp 90 "$PYTHON" bench/ddp.py --nproc 2 --device cpu --steps 40 --timeout 50 --out "$LOGS/ddp"
  report_step ddp
  ((STEP_RC == 0)) && report_output ddp "^torchrun exit status"
elif ((GPUS >= 2)); then
  run_step ddp 90 "$PYTHON" bench/ddp.py --nproc "$GPUS" --device cuda --steps 200 --timeout 50 --out "$LOGS/ddp"
  report_step ddp
  ((STEP_RC == 0)) && report_output ddp "^torchrun exit status"
else
  STEP_WALL=0.0 STEP_LIMIT=0
  echo "(not run)" >"$LOGS/ddp.cmd"
  GPU_COUNT="$GPUS GPU$( ((GPUS == 1)) || echo s)"
  report_step ddp "not checked" "$GPU_COUNT"
  say "" "$GPU_COUNT: NCCL data-parallel not checked; the gloo tests cover the logic (tests/test_ddp.py)."
fi

# --- summary -------------------------------------------------------------------------------------------------
say "" "## Summary" "" "| step | result | wall s | limit s |" "|---|---|---|---|"
for i in "${!NAMES[@]}"; do
  say "| ${NAMES[$i]} | ${RESULTS[$i]} | ${WALLS[$i]} | ${LIMITS[$i]} |"
done
say "" "Total: $SECONDS s. $( ((FAILED)) && echo "Some step FAILED: exit status 1." || echo "Every step that ran passed.")"
exit "$FAILED"
