#!/usr/bin/env bash
# Everything FFA runs on a GPU machine, in stages that each fit one 10-minute command.
# Run from the repository root on the GPU machine; logs and JSON go to $OUT (default
# ./gpu-out). FFA comes from the wheel in .whl-ffa/ when there is one (installed with
# --no-deps into /tmp/ffa-wheel, and the repository root kept off sys.path so that `import
# ffa` is the installed wheel), else from this checkout, building ffa/lib for sm_90 if needed.
#
#   scripts/gpu_session.sh check   GPU tests, example.py, python -m ffa.tuner (default sweep)
#   scripts/gpu_session.sh bench   bench/kernel_bench.py (uses the tuner cache in $FFA_TUNER_CACHE_DIR)
#   scripts/gpu_session.sh hf        bench/hf_generate.py $HF_ARGS (output named $HF_NAME)
#   scripts/gpu_session.sh sanitize  scripts/sanitize.sh (compute-sanitizer's four tools)
# The tuner cache lives in $FFA_TUNER_CACHE_DIR (default build/ffa-tuner/: the GPU machine keeps
# git-ignored build outputs between calls, so a later stage finds it; `check` also copies it to
# $OUT). Paths excluded only in .git/info/exclude do not stay there between calls. The device's
# copy of the tree has no .git: pass the commit as FFA_COMMIT=<hash> so that the results name it.
set -euo pipefail
stage=${1:?usage: scripts/gpu_session.sh check|bench|hf|sanitize}
repo=$(pwd)
OUT=${OUT:-$repo/gpu-out}
mkdir -p "$OUT"
source scripts/device_env.sh
export FFA_TUNER_CACHE_DIR=${FFA_TUNER_CACHE_DIR:-$repo/build/ffa-tuner}
run_dir=$repo
if compgen -G ".whl-ffa/*.whl" >/dev/null; then
  python3 -m pip install -q --no-deps --no-index --target /tmp/ffa-wheel .whl-ffa/*.whl
  export PYTHONPATH=/tmp/ffa-wheel:/tmp/site
  run_dir=/tmp/ffa-run  # programs are copied here so their own directory holds no ffa/
  mkdir -p $run_dir && cp example.py summarize.py $run_dir/ && cp -r bench $run_dir/
elif [ ! -f ffa/lib/libffa.so ]; then
  FFA_CUDA_ARCHS=90 python3 setup.py -q build_native
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"
export FFA_COMMIT=${FFA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
echo "$FFA_COMMIT" > "$OUT/commit.txt"
(cd /tmp && python3 -m ffa) | tee "$OUT/info.txt"

case $stage in
check)
  (cd /tmp && python3 -m pytest -q -m gpu "$repo/tests" -p no:cacheprovider 2>&1) | tee "$OUT/gpu_tests.log" | tail -5
  (cd $run_dir && python3 example.py) | tee "$OUT/example.log"
  (cd $run_dir && python3 example.py --default-launch) | tee -a "$OUT/example.log"
  (cd /tmp && time python3 -m ffa.tuner 2>&1) 2>&1 | tee "$OUT/tuner.log" | tail -25
  cp "$FFA_TUNER_CACHE_DIR"/*.json "$OUT/" || true
  ;;
bench)
  (cd $run_dir && python3 bench/kernel_bench.py --out "$OUT/kernel-bench.json" ${BENCH_ARGS:-}) 2>&1 |
    grep -v -i warn | tee "$OUT/kernel-bench.log" | tail -90
  ;;
hf)
  (cd $run_dir && python3 bench/hf_generate.py --out "$OUT/${HF_NAME:-hf_generate}.json" ${HF_ARGS:-}) 2>&1 |
    grep -v -i warn | tee "$OUT/${HF_NAME:-hf_generate}.log" | tail -40
  ;;
sanitize)
  lib=$(python3 -c "import ffa._lib as l; print(l.library_path())")
  FFA_LIBRARY=$lib OUT=$OUT bash scripts/sanitize.sh
  ;;
*) echo "unknown stage $stage"; exit 2 ;;
esac
