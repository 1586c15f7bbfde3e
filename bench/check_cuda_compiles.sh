#!/usr/bin/env bash
# Compile (not link) every csrc/cuda/*.cu with nvcc against the torch headers of the Python in use.
# For machines without a CUDA build of torch (the CPU development machine): a CPU torch wheel ships
# the ATen/cuda and c10/cuda headers but no libc10_cuda/libtorch_cuda, so linking is impossible there;
# this proves the kernels, the launch helpers and the dispatcher registration compile for sm_90 (H100).
#
# Usage: bench/check_cuda_compiles.sh [PYTHON]   (default: .venv/bin/python, else python3)
# Env:   ARCH (default sm_90), CUDA_STD (default: c++20 as CMakeLists.txt uses with nvcc >= 12, then
#        c++17 if that fails), NVCC (default nvcc).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
NVCC=${NVCC:-nvcc}
ARCH=${ARCH:-sm_90}
command -v "$NVCC" >/dev/null || { echo "check_cuda_compiles: $NVCC not found" >&2; exit 1; }

includes=()
while IFS= read -r d; do includes+=("-I$d"); done < <("$PY" - <<'PYEOF'
import sysconfig
import pybind11
import torch.utils.cpp_extension as c
for d in c.include_paths():
    print(d)
print(pybind11.get_include())
print(sysconfig.get_paths()["include"])
PYEOF
)
abi=$("$PY" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
tv=$("$PY" -c "import torch; print(torch.__version__)")
echo "check_cuda_compiles: $("$NVCC" --version | tail -1); torch $tv; arch $ARCH"

# No -Icsrc: csrc/math.h would shadow the system <math.h> that CCCL's <cuda/std/cmath> includes (the
# errors read "the global scope has no fpclassify"); the .cu files include "../math.h" relative to
# themselves, and CMakeLists.txt gives csrc to C++ sources only.
# C10_CUDA_NO_CMAKE_CONFIGURE_FILE: a CPU torch wheel lacks the generated c10/cuda/impl/cuda_cmake_macros.h
# (it only defines C10_CUDA_BUILD_SHARED_LIBS, which matters for Windows dllimport); a CUDA torch has it.
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
for f in csrc/cuda/*.cu; do
  ok=0
  for std in ${CUDA_STD:-c++20 c++17}; do
    cmd=("$NVCC" -c "$f" -o "$out/$(basename "$f").o" -std="$std" -arch="$ARCH" -O3 -Xcompiler -fPIC
         --expt-relaxed-constexpr "${includes[@]}" -DTORCH_EXTENSION_NAME=_C -DLIPFAST_WITH_CUDA
         -D_GLIBCXX_USE_CXX11_ABI="$abi" -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -Werror all-warnings)
    start=$(date +%s)
    if "${cmd[@]}" 2>"$out/log"; then
      echo "  OK   $f (-std=$std, $(( $(date +%s) - start )) s, $(stat -c %s "$out/$(basename "$f").o") bytes)"
      ok=1
      break
    fi
    echo "  FAIL $f (-std=$std):"
    sed 's/^/    /' "$out/log" | head -40
  done
  [ $ok = 1 ] || status=1
done
echo "+ ${cmd[*]}"
exit $status
