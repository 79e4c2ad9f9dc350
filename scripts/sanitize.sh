#!/usr/bin/env bash
# compute-sanitizer's four tools over scripts/sanitize_cases.py (every kernel family, checked
# against the float64 reference): memcheck, racecheck, initcheck and synccheck must each report
# zero errors. Run from anywhere on the GPU machine; FFA comes from this checkout (ffa/lib/
# libffa.so, built for sm_90 when missing).
#
#   OUT=$OUT bash scripts/sanitize.sh
#
# Writes $OUT/sanitize.txt (a summary table: tool, status, errors, cases, seconds) and one log
# per tool, $OUT/sanitize-<tool>.log; exits 1 unless every tool is clean. OUT defaults to
# ./sanitize-out. SANITIZE_TOOLS picks tools ("none" is a plain run), SANITIZE_TIMEOUT bounds
# each run in seconds (default 110: five runs fit one 10-minute command), SANITIZE_ONLY passes
# --only to the cases program. The summary names the commit ($FFA_COMMIT where set, else git's HEAD)
# and the library's source hash (ffa/lib/libffa.build.json).
#
# Flags: --error-exitcode 1 makes any finding fail the tool. PyTorch's caching allocator is off
# (PYTORCH_NO_CUDA_MEMORY_CACHING=1), so every tensor is its own cudaMalloc: memcheck sees its
# exact bounds (plus 256 bytes of --padding between allocations) and initcheck sees memory that
# nothing wrote. --report-api-errors no leaves out CUDA API calls that fail on purpose (PyTorch's
# and the driver's probes); FFA checks every return code itself, so a failing call of FFA's
# stops the program, which the summary shows. No kernel filter: every kernel runs instrumented,
# so initcheck knows what PyTorch's copy kernels wrote. --launch-timeout 0 waits for Python to
# start however long it takes (the timeout around each run bounds it).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
OUT=${OUT:-$repo/sanitize-out}
mkdir -p "$OUT"
tools=${SANITIZE_TOOLS:-none memcheck racecheck initcheck synccheck}
limit=${SANITIZE_TIMEOUT:-110}

if [ -f scripts/device_env.sh ]; then source scripts/device_env.sh; fi  # carried wheels, if any
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
FFA_TUNER_CACHE_DIR=$(mktemp -d) && export FFA_TUNER_CACHE_DIR
sanitizer=$(command -v compute-sanitizer || ls -d /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | tail -1)
if [ -z "$sanitizer" ]; then echo "compute-sanitizer not found" >&2; exit 2; fi
if [ ! -f ffa/lib/libffa.so ]; then FFA_CUDA_ARCHS=90 python3 setup.py -q build_native || exit 2; fi

common=(--error-exitcode 1 --report-api-errors no --show-backtrace device --print-limit 20 --launch-timeout 0)
tool_flags() {
  case $1 in
  memcheck) echo --padding 256 ;;
  racecheck) echo --racecheck-report all ;;
  esac
}
cases=(python3 scripts/sanitize_cases.py ${SANITIZE_ONLY:+--only "$SANITIZE_ONLY"})

summary=$OUT/sanitize.txt
{
  echo "# compute-sanitizer over scripts/sanitize_cases.py, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "# GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  echo "# $("$sanitizer" --version | tail -1); commit ${FFA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}; library sources $(python3 -c 'import json; print(json.load(open("ffa/lib/libffa.build.json"))["sources"][:12])' 2>/dev/null || echo unknown)"
  echo "# flags: ${common[*]} (memcheck: $(tool_flags memcheck); racecheck: $(tool_flags racecheck))"
  printf '%-10s %-8s %7s %9s %6s %8s\n' tool status errors warnings cases seconds
} >"$summary"

failed=0
for tool in $tools; do
  log=$OUT/sanitize-$tool.log
  began=$SECONDS
  if [ "$tool" = none ]; then
    timeout "$limit" "${cases[@]}" >"$log" 2>&1
  else
    # shellcheck disable=SC2046  # tool_flags is a word list on purpose
    timeout "$limit" "$sanitizer" --tool "$tool" "${common[@]}" $(tool_flags "$tool") "${cases[@]}" >"$log" 2>&1
  fi
  rc=$?
  seconds=$((SECONDS - began))
  errors=$(grep -oE 'ERROR SUMMARY: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+$')
  race=$(grep -oE 'RACECHECK SUMMARY: .*' "$log" | tail -1)
  warnings=$(echo "$race" | grep -oE '[0-9]+ warning' | grep -oE '[0-9]+')
  [ -z "$errors" ] && errors=$(echo "$race" | grep -oE '[0-9]+ error' | grep -oE '[0-9]+')
  passed=$(grep -oE 'sanitize_cases: [0-9]+ cases passed' "$log" | grep -oE '[0-9]+')
  [ "$tool" = none ] && errors=0
  status=clean
  if [ "$rc" = 124 ]; then status=timeout
  elif [ -z "$passed" ]; then status=failed   # the program did not finish its cases
  elif [ "$rc" != 0 ] || [ "${errors:-x}" != 0 ]; then status=errors
  fi
  [ "$status" = clean ] || failed=1
  printf '%-10s %-8s %7s %9s %6s %8s\n' "$tool" "$status" "${errors:-?}" "${warnings:--}" "${passed:-?}" \
    "$seconds" >>"$summary"
done

{
  echo
  for tool in $tools; do  # the first finding of each tool that had one, for triage
    finding='^========= +(Invalid|Uninitialized|Error|Race|Barrier|Warp|Program hit|Out-of-range|Misaligned)'
    first=$(grep -m1 -E "$finding|^(Traceback|AssertionError|.*Error:)" "$OUT/sanitize-$tool.log")
    [ -n "$first" ] && echo "$tool: $first"
  done
  [ "$failed" = 0 ] && echo "all tools clean" || echo "NOT CLEAN: see $OUT/sanitize-<tool>.log"
} >>"$summary"
cat "$summary"
exit "$failed"
