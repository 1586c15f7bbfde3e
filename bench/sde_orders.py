"""Strong and weak convergence orders of lipfast.sde's solvers on geometric Brownian motion.

GBM ``dX = mu X dt + s X dW`` has the exact solution ``X_T = x0 exp((mu − s²/2) T + s W_T)``. One
fine Brownian path per sample is drawn once; every coarser grid (``dt`` halving) sums the same
fine increments, so the numerical and the exact solutions are driven by the same path.

* strong error ``E|X_N − X_T|`` (pathwise), fitted order ≈ ``strong_order`` of the class;
* weak error ``|E[X_N − X_T]|`` (a control-variate estimate of ``|E X_N − E X_T|``: the
  difference is taken path by path, so its Monte-Carlo error is ``std(X_N − X_T)/sqrt(M)``, much
  smaller than that of ``E X_N`` alone).

Not a test: the fast suite (tests/test_sde.py) checks moments; this checks orders.
    python bench/sde_orders.py            # < 60 s on 2 CPU cores
    python bench/sde_orders.py --quick    # a few seconds, smoke run
Asserts the fitted strong orders: Euler 0.5 ± 0.15, Milstein 1.0 ± 0.2.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from lipfast import sde

MU, SIGMA, X0, T = 1.0, 0.8, 1.0, 1.0
STRONG_TOL = {"euler": (0.5, 0.15), "milstein": (1.0, 0.2)}
WEAK_TOL = (1.0, 0.25)  # both schemes have weak order 1; checked when >= 3 levels are resolved


def _fit_order(dts: list[float], errs: list[float]) -> float:
    """Least-squares slope of ``log err`` against ``log dt``."""
    return float(np.polyfit(np.log(dts), np.log(errs), 1)[0])


def run(levels: range, n_paths: int, seed: int) -> dict[str, dict]:
    """Errors of each solver on the grids ``dt = T / 2**k`` for ``k`` in ``levels``.

    Returns:
        ``{method: {"dt": [L], "strong": [L], "weak": [L], "weak_se": [L]}}``.
    """
    gen = torch.Generator().manual_seed(seed)
    n_fine = 2 ** levels[-1]
    dW_fine = torch.randn(n_fine, n_paths, 1, generator=gen, dtype=torch.float64) * math.sqrt(T / n_fine)
    W_T = dW_fine.sum(0)
    exact = X0 * torch.exp((MU - SIGMA**2 / 2) * T + SIGMA * W_T)

    def f(t, x):
        return MU * x

    def g(t, x):
        return SIGMA * x

    results: dict[str, dict] = {}
    for method in ("euler", "milstein"):
        solver = sde.select(method)(f, g, "diagonal")
        res = {"dt": [], "strong": [], "weak": [], "weak_se": []}
        for k in levels:
            n = 2**k
            h = T / n
            dW = dW_fine.reshape(n, n_fine // n, n_paths, 1).sum(1)  # the same path, coarser grid
            x = torch.full((n_paths, 1), X0, dtype=torch.float64)
            for i in range(n):
                x = solver.step(i * h, h, x, dW[i])
            diff = x - exact
            res["dt"].append(h)
            res["strong"].append(diff.abs().mean().item())
            res["weak"].append(abs(diff.mean().item()))
            res["weak_se"].append(diff.std().item() / math.sqrt(n_paths))
        results[method] = res
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run (smoke test)")
    parser.add_argument("--paths", type=int, default=None, help="Monte-Carlo paths (default 20000, quick 4000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    levels = range(2, 7) if args.quick else range(3, 10)
    n_paths = args.paths or (4000 if args.quick else 20000)
    t0 = time.perf_counter()
    results = run(levels, n_paths, args.seed)
    elapsed = time.perf_counter() - t0

    print(
        f"GBM dX = {MU} X dt + {SIGMA} X dW, x0 = {X0}, T = {T}; {n_paths} paths, float64; "
        f"device cpu, {torch.get_num_threads()} threads; {elapsed:.1f} s"
    )
    print(f"{'method':<9} {'dt':>10} {'strong E|err|':>14} {'weak |E err|':>13} {'± MC SE':>10}")
    fitted = {}
    for method, res in results.items():
        for h, s, w, se in zip(res["dt"], res["strong"], res["weak"], res["weak_se"]):
            print(f"{method:<9} {h:>10.6f} {s:>14.3e} {w:>13.3e} {se:>10.1e}")
        strong = _fit_order(res["dt"], res["strong"])
        resolved = [i for i, (w, se) in enumerate(zip(res["weak"], res["weak_se"])) if w > 3 * se]
        weak = float("nan")
        if len(resolved) >= 2:
            weak = _fit_order([res["dt"][i] for i in resolved], [res["weak"][i] for i in resolved])
        cls = sde.select(method)
        fitted[method] = (strong, weak, len(resolved))
        print(
            f"{method:<9} fitted strong order {strong:.3f} (declared {cls.strong_order}), "
            f"weak order {weak:.3f} over {len(resolved)} resolved levels (declared {cls.weak_order})"
        )

    for method, (target, tol) in STRONG_TOL.items():
        strong, weak, n_resolved = fitted[method]
        assert abs(strong - target) <= tol, f"{method}: fitted strong order {strong:.3f} outside {target} ± {tol}"
        if n_resolved >= 3:
            assert abs(weak - WEAK_TOL[0]) <= WEAK_TOL[1], (
                f"{method}: fitted weak order {weak:.3f} outside {WEAK_TOL[0]} ± {WEAK_TOL[1]}"
            )
    print(
        "orders within tolerance: strong "
        + ", ".join(f"{m} {target}±{tol}" for m, (target, tol) in STRONG_TOL.items())
        + f"; weak {WEAK_TOL[0]}±{WEAK_TOL[1]} (where resolved)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
