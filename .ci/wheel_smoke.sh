#!/usr/bin/env bash
# Wheel smoke test (run by .ci/run after the README's test command; runs alone as well):
# build lipfast's wheel with `pip wheel`, install it with torch into a fresh virtual environment that
# does not see the system or the project's packages, and use it from outside the repository, so the
# source tree cannot be what gets imported. A wheel works with the torch version it was built against.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export LIPFAST_CUDA=${LIPFAST_CUDA:-OFF}    # CI's CPU-only build
export PIP_DISABLE_PIP_VERSION_CHECK=1
TORCH_PIN=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")   # the torch it is built against
work=$(mktemp -d -t lipfast-wheel-smoke.XXXXXX)
trap 'rm -rf "$work"' EXIT
t0=$(date +%s)
passed=0

echo "+ $PY -m pip wheel . --no-build-isolation --no-deps -w $work/dist"
"$PY" -m pip wheel . --no-build-isolation --no-deps -q -w "$work/dist"
wheel=$(ls "$work"/dist/lipfast-*.whl)
echo "wheel-smoke: built $(basename "$wheel") ($(du -k "$wheel" | cut -f1) KiB) in $(( $(date +%s) - t0 )) s"
passed=$((passed + 1))

t1=$(date +%s)
python3 -m venv "$work/venv"                       # no --system-site-packages: nothing leaks in
"$work/venv/bin/python" -m pip install -q "torch==$TORCH_PIN" numpy "$wheel"
echo "wheel-smoke: fresh venv with torch==$TORCH_PIN, numpy and the wheel in $(( $(date +%s) - t1 )) s"

cd "$work"                                         # outside the repository
"$work/venv/bin/python" - "$work" <<'PYEOF'
import sys

import torch

import lipfast
from lipfast import reference

where = lipfast.__file__
assert where.startswith(sys.argv[1]), f"imported lipfast from {where}, not from the fresh venv"
assert lipfast._C.torch_version.split("+")[0] == torch.__version__.split("+")[0]
torch.manual_seed(0)
W = torch.randn(30, 20, dtype=torch.float64)
spec = lipfast.spectrum(W, k=3)
assert abs(float(spec.sigma) - float(torch.linalg.matrix_norm(W, 2))) < 1e-8 * float(spec.sigma)
X, D = torch.randn(5, 20, dtype=torch.float64), torch.randn(5, 30, dtype=torch.float64)
ps = lipfast.persample(spec, X, D)
ref = reference.persample_linear(X[:, None], D[:, None], spec.U, spec.S, spec.V, float(spec.sigma_next))
assert ps.proj.shape == (5,) and torch.allclose(ps.proj, ref[0]) and torch.allclose(ps.hess, ref[1])
print(f"wheel-smoke: lipfast {lipfast.__version__} from {where}: spectrum and persample OK "
      f"(torch {torch.__version__}, CUDA kernels: {lipfast._C.with_cuda})")
PYEOF
passed=$((passed + 1))
"$work/venv/bin/lipfast" --help > "$work/help.txt"
grep -q "usage: lipfast" "$work/help.txt"
echo "wheel-smoke: 'lipfast --help' OK ($(wc -l < "$work/help.txt") lines)"
passed=$((passed + 1))
echo "wheel-smoke: $(( $(date +%s) - t0 )) s in all"
echo "wheel-smoke: $passed passed, 0 failed"
