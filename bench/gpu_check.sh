#!/usr/bin/env bash
# GPU check of lipfast (issue 7), for a GPU machine (e.g. one H100): rebuild in place with the CUDA
# kernels, prove they are there, run every CUDA test, and time and profile a tracked training step.
# 2-3.5 minutes on one H200 (the build ~1 minute of it); must stay under 8.
#
#   bash bench/gpu_check.sh            # from the repository root, with the python that has torch
#
# Run it on the GPU machine only: it reinstalls lipfast (non-editable) into PYTHON's environment.
# Env: PYTHON (default: python3), OUT (a folder for the logs: build.log, pytest_cuda.log,
# bench_step_gpu.{log,md,json}, profile_step_gpu.{log,md}, summary.txt; default: a fresh temporary folder),
# CMAKE_CUDA_ARCHITECTURES (default 90) and TORCH_CUDA_ARCH_LIST (default 9.0): the target GPU.
# Needs on the machine: a CUDA build of torch, nvcc, CMake, ninja, scikit-build-core, pybind11,
# pytest, numpy. No network: nothing is downloaded (--no-build-isolation --no-deps).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${OUT:-$(mktemp -d -t lipfast-gpu-check.XXXXXX)}
mkdir -p "$LOG"
export CMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES:-90}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export LIPFAST_CUDA=ON              # a build that cannot make the CUDA kernels fails at configure
export LIPFAST_REQUIRE_CUDA=1       # tests/test_cuda.py fails instead of skipping without GPU or kernels
export PIP_DISABLE_PIP_VERSION_CHECK=1
T0=$(date +%s)
declare -a SUMMARY=()
status=0
step() {  # step NAME LOGFILE CMD...: run, tee the output, record pass/fail and seconds
  local name=$1 log=$2 t=$(date +%s) rc
  shift 2
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$LOG/$log"
  rc=${PIPESTATUS[0]}
  SUMMARY+=("$(printf '%-8s %-44s %4ss  %s' "$([ $rc = 0 ] && echo PASS || echo "FAIL($rc)")" "$name" \
             $(( $(date +%s) - t )) "$LOG/$log")")
  [ $rc = 0 ] || status=1
  return $rc
}

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  else echo "nvidia-smi: not found"; fi
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -1)"; echo "cmake: $(cmake --version 2>/dev/null | head -1)"
  echo "CMAKE_CUDA_ARCHITECTURES=$CMAKE_CUDA_ARCHITECTURES TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
} 2>&1 | tee "$LOG/environment.txt"

# 1. Build in place against the torch installed here (never carry a .so from another machine).
step "build (pip install --no-build-isolation .)" build.log \
  "$PY" -m pip install --no-build-isolation --no-deps --force-reinstall -v . \
    -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$CMAKE_CUDA_ARCHITECTURES" -Ccmake.define.LIPFAST_CUDA=ON
grep -E "lipfast: |gencode|generate-code" "$LOG/build.log" | grep -v "^\s*$" | sort -u | head -8

# The installed package, not the source tree: run Python from a folder without lipfast/ in it.
cd tests
step "CUDA kernels present" kernels.log "$PY" -c "
import torch, lipfast
assert lipfast._C.with_cuda, 'lipfast was built without CUDA kernels'
assert torch.cuda.is_available(), 'no CUDA device'
for op in ('persample_linear', 'hessian_contract', 'subspace_iteration', 'gradient_statistics', 'update_statistics'):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f'lipfast::{op}', 'CUDA'), op
print('lipfast', lipfast.__version__, 'from', lipfast.__file__, '| CUDA kernels registered on', torch.cuda.get_device_name())"

# 2. Every CUDA test: tests/test_cuda.py and the device-parametrised op tests (conftest marks them cuda).
step "pytest -m cuda" pytest_cuda.log \
  "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider test_cuda.py test_build.py test_op_*.py
cd ..

# 3. Step benchmark: tracked vs plain, MLP 784-512-512-10 and ResNet-18 on 3x32x32, batch 256.
step "bench_step_gpu.py --device cuda" bench_step_gpu.log \
  env OUT="$LOG" "$PY" bench/bench_step_gpu.py --device cuda --out "$LOG"

# 4. Where the tracked step's time goes: kernel time, launches and host syncs per step, top kernels.
step "profile_step_gpu.py --device cuda" profile_step_gpu.log \
  "$PY" bench/profile_step_gpu.py --device cuda --out "$LOG"

{
  echo
  echo "gpu_check: $(( $(date +%s) - T0 )) s in all; logs in $LOG"
  printf '%s\n' "${SUMMARY[@]}"
  grep -E "tracked/plain" "$LOG/bench_step_gpu.log" 2>/dev/null
} | tee "$LOG/summary.txt"
exit $status
