"""Core ops of lipfast against their reference.py twins.

Cases (float32 by default, k = 8, the sizes of an MLP 784-512-512-10):
- persample_linear: Linear 784→512 and 512→512 at B=128 (T=1), and a sequence B=16, T=64, 256→256;
  the compiled op vs ``reference.persample_linear``, eager and under ``torch.compile``, and the public
  ``lipfast.persample`` (argument checks and the NaN/Inf scan included); with T=1 also ATen's GEMMs for
  the op's two products alone.
- subspace_iteration: warm start of a 512×784 init-like matrix one small step later, two sweeps
  (fixed, so op and twin do the same work); plus ``lipfast.spectrum`` with its default stopping
  rule, ``torch.linalg.svd`` and ``torch.svd_lowrank`` for scale and accuracy.
- persample_linear.sums: the same plus Σ G_i v1, Σ G_iᵀ u1 (what the tracker calls), Linear 2048→2048 at
  B=256, vs the plain op followed by the four GEMVs the tracker used to run, ATen's two GEMMs alone, and
  vs the twin.
- conv2d_projections: G_i v1 and G_iᵀ u1 of the runs' small CNN (conv 1→32 at 28×28 and conv 32→64 at
  14×14, B=128, 3×3, padding 1), the CPU kernel vs the composite kernel (ATen convolutions, what other
  backends run) and the twin.
- hessian_contract: N=128 directions projected on k=8 triplets, op vs twin.
- hessian_tail: the second-order term's unknown tail after one small step of a 512×784 layer, with an
  init-like flat spectrum and with a trained-like one (σ_{k+1} = 0.8 σ1): the op (its conjugate-gradient
  steps in the note) vs the ``track_update`` call that runs it after every tracked step, and the twin.
- hessian_form: one 512×784 direction, ``lipfast.hessian_form`` vs the same route through the twin,
  and the dense ground truth ``reference.hessian_form_dense``.

Every implementation's output is checked against the reference before it is timed; the
implementations of one case are timed interleaved (``_harness.time_interleaved``).

    python bench/bench_ops.py --device cpu --dtype float32 --quick
"""

from __future__ import annotations

import time

import torch

import _harness as H  # bench/ is sys.path[0] when this script runs
import lipfast
from lipfast import ops, reference

K = 8
# Compiled op vs reference twin: float32 GEMM rounding vs the twin's float64 upcast (tests/conftest.py).
PARITY = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-7, atol=1e-7)}


def get_configs(device: str, dtype: torch.dtype, quick: bool) -> list[H.Config]:
    cfg = lambda name, **p: H.Config(name=name, params=p, device=device, dtype=dtype)  # noqa: E731
    configs = [
        cfg("persample_linear 784→512 B=128", kind="persample", B=128, T=1, n=784, m=512),
        cfg("persample_linear 512→512 B=128", kind="persample", B=128, T=1, n=512, m=512),
        cfg("persample_linear B=16 T=64 256→256", kind="persample", B=16, T=64, n=256, m=256),
        cfg("persample_linear.sums 2048→2048 B=256", kind="persample_sums", B=256, n=2048, m=2048),
        cfg("conv2d_projections 1→32 28×28 B=128", kind="conv", B=128, C=1, Co=32, hw=28),
        cfg("conv2d_projections 32→64 14×14 B=128", kind="conv", B=128, C=32, Co=64, hw=14),
        cfg("subspace_iteration warm 512×784", kind="spectrum", m=512, n=784, sweeps=2),
        cfg("hessian_contract N=128", kind="contract", N=128),
        cfg("hessian_tail 512×784 init-like", kind="tail", m=512, n=784, spectrum="init"),
        cfg("hessian_tail 512×784 trained-like", kind="tail", m=512, n=784, spectrum="trained"),
        cfg("hessian_form 512×784, 1 direction", kind="hessian_form", m=512, n=784),
    ]
    if quick:  # one representative of each kind
        configs = [c for c in configs if c.name not in ("persample_linear 512→512 B=128",
                                                        "conv2d_projections 1→32 28×28 B=128",
                                                        "hessian_tail 512×784 trained-like")]
    return configs


def _linear_weight(m: int, n: int, device, dtype) -> torch.Tensor:
    """nn.Linear's default initialisation (kaiming-uniform, a = √5): U(−1/√n, 1/√n)."""
    return (torch.rand(m, n, device=device, dtype=dtype) * 2 - 1) / n**0.5


def _setup_spectrum(W: torch.Tensor) -> lipfast.Spectrum:
    """A top-k Spectrum to feed the per-sample and Hessian cases. Their timings do not depend on how
    well it converged (op and twin get the same one), but the public functions NaN the Hessian terms of a
    spectrum whose σ1, σ2 are not resolved beyond their residuals (``Spectrum.degenerate``): init-like
    matrices (σ1/σ2 ≈ 1.01) need a few hundred cold sweeps for that."""
    return lipfast.spectrum(W, k=K, iters=300, tol=1e-6)


class _Case:
    """Collects the implementations of one case (checked first), then times them interleaved."""

    def __init__(self, config: H.Config, opts):
        self.config, self.opts = config, opts
        self.impls: list[tuple[str, object, str]] = []
        self.skipped: list[H.Result] = []

    def add(self, name, fn, note="", *, check=None):
        """``check(output)`` must raise if the output is wrong; it runs before any timing."""
        if check is not None:
            check(fn())
        self.impls.append((name, fn, note))

    def add_compiled(self, name, fn, args, *, check, note=""):
        """``torch.compile(fn)`` on ``args`` (skipped with a note in --quick, with --no-compile, or
        if compiling fails on this machine)."""
        if not self.opts.compile:
            self.skipped.append(H.skipped(self.config, name, self.opts.why_no_compile))
            return
        t0 = time.perf_counter()
        compiled, err = H.try_compile(fn, *args, dynamic=False)
        if compiled is None:
            self.skipped.append(H.skipped(self.config, name, err))
            return
        note = f"compile {time.perf_counter() - t0:.0f} s" + (f"; {note}" if note else "")
        self.add(name, lambda: compiled(*args), note, check=check)

    def run(self) -> list[H.Result]:
        timed = H.time_interleaved(self.config, self.impls, min_run_time=self.opts.min_run_time,
                                   rounds=self.opts.rounds, warmup=self.opts.warmup)
        order = [name for name, _, _ in self.impls]
        return sorted(timed + self.skipped,
                      key=lambda r: order.index(r.impl) if r.impl in order else len(order))


def _parity(config, what):
    tol = PARITY[config.dtype]
    return lambda expected: (lambda out: H.assert_close(out, expected, **tol, what=f"{config.name}: {what}"))


def run_persample(config, opts):
    p, dev, dt = config.params, config.device, config.dtype
    W = _linear_weight(p["m"], p["n"], dev, dt)
    spec = _setup_spectrum(W)
    X = torch.randn(p["B"], p["T"], p["n"], device=dev, dtype=dt)
    D = torch.randn(p["B"], p["T"], p["m"], device=dev, dtype=dt) * 1e-2
    args = (X, D, spec.U, spec.S, spec.V, float(spec.sigma_next))
    expected = reference.persample_linear(*args)
    X2, D2 = (X[:, 0], D[:, 0]) if p["T"] == 1 else (X, D)
    case = _Case(config, opts)
    case.add("lipfast op", lambda: ops.persample_linear(*args), check=_parity(config, "lipfast op")(expected))
    case.add("lipfast.persample", lambda: lipfast.persample(spec, X2, D2), "public: checks + NaN/Inf scan",
             check=lambda ps: _parity(config, "lipfast.persample")(expected)((ps.proj, ps.hess, ps.hess_lo, ps.hess_hi)))
    if p["T"] == 1:
        _add_gemms_alone(case, X2, D2, spec)
    case.add("reference", lambda: reference.persample_linear(*args))
    case.add_compiled("reference + compile", reference.persample_linear, args,
                      check=_parity(config, "reference + compile")(expected))
    return case.run()


def run_persample_sums(config, opts):
    p, dev, dt = config.params, config.device, config.dtype
    W = _linear_weight(p["m"], p["n"], dev, dt)
    spec = _setup_spectrum(W)
    X = torch.randn(p["B"], 1, p["n"], device=dev, dtype=dt)
    D = torch.randn(p["B"], 1, p["m"], device=dev, dtype=dt) * 1e-2
    args = (X, D, spec.U, spec.S, spec.V, float(spec.sigma_next))
    expected = reference.persample_linear(*args, sums=True)
    X2, D2, u1, v1 = X[:, 0], D[:, 0], spec.U[:, 0], spec.V[:, 0]

    def op_then_gemvs():  # the tracker before the .sums overload
        return (*ops.persample_linear(*args), torch.mv(D2.mT, torch.mv(X2, v1)), torch.mv(X2.mT, torch.mv(D2, u1)))

    case = _Case(config, opts)
    case.add("lipfast op", lambda: ops.persample_linear(*args, sums=True),
             check=_parity(config, "lipfast op")(expected))
    case.add("op + 4 GEMVs", op_then_gemvs, "the plain op, then the sums as torch.mv",
             check=_parity(config, "op + 4 GEMVs")(expected))
    _add_gemms_alone(case, X2, D2, spec)
    case.add("reference", lambda: reference.persample_linear(*args, sums=True))
    return case.run()


def _add_gemms_alone(case, X2, D2, spec):
    """The op's two products X·V and D·U alone, as ATen's GEMM (Vᵀ·Xᵀ, its fastest orientation here): what
    an MLP layer's op computed before its single pass over the rows, without the norms, sums and terms."""
    Vt, Ut = spec.V.mT.contiguous(), spec.U.mT.contiguous()
    case.add("ATen's 2 GEMMs alone", lambda: (Vt.mm(X2.mT), Ut.mm(D2.mT)), "X·V, D·U only: no norms, sums, terms")


_COMPOSITE = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


def run_conv(config, opts):
    p, dev, dt = config.params, config.device, config.dtype
    B, C, Co, hw = p["B"], p["C"], p["Co"], p["hw"]
    x = torch.randn(B, C, hw, hw, device=dev, dtype=dt)
    g = torch.randn(B, Co, hw, hw, device=dev, dtype=dt) * 1e-2
    W = _linear_weight(Co, C * 9, dev, dt)
    U, _, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    args = (x, g, U[:, 0].to(dt), Vh[0].to(dt), [3, 3], [1, 1], [1, 1], [1, 1])
    expected = reference.conv2d_projections(*args)
    op = torch.ops.lipfast.conv2d_projections.default
    case = _Case(config, opts)
    case.add("lipfast op", lambda: ops.conv2d_projections(*args), check=_parity(config, "lipfast op")(expected))
    case.add("composite kernel", lambda: op.redispatch(_COMPOSITE, *args), "ATen convolutions (other backends)",
             check=_parity(config, "composite kernel")(expected))
    case.add("reference", lambda: reference.conv2d_projections(*args))
    return case.run()


def run_spectrum(config, opts):
    p, dev, dt = config.params, config.device, config.dtype
    m, n, sweeps = p["m"], p["n"], p["sweeps"]
    W0 = _linear_weight(m, n, dev, dt)
    prev = lipfast.spectrum(W0, k=K)
    W1 = W0 + 1e-3 * W0.abs().mean() * torch.randn_like(W0)  # one small SGD-like step later
    S_true = torch.linalg.svdvals(W1.to(torch.float64))
    sigma1 = float(S_true[0])
    V0 = prev.basis
    pb = V0.shape[1]
    args = (W1, V0, K + 1, sweeps, 0.0)  # tol 0: exactly `sweeps` sweeps, no host sync for the test
    _, Sr, _, _, itr, *_ = reference.subspace_iteration(*args)
    assert int(itr) == sweeps
    err = lambda s1: f"σ1 rel. err {abs(float(s1) - sigma1) / sigma1:.1e}"  # noqa: E731
    check_S = lambda what: (lambda out: H.assert_close(out[1], Sr, **PARITY[dt], what=f"{config.name}: {what}"))  # noqa: E731
    warm = lipfast.spectrum(W1, k=K, state=prev)
    # Each Ritz value lies within its residual of a singular value (here: the matching one).
    assert bool(((warm.S - S_true[:K]).abs() <= warm.residuals + 10 * torch.finfo(dt).eps * sigma1).all())
    lowrank_s1 = torch.svd_lowrank(W1, q=pb, niter=2)[1][0]
    case = _Case(config, opts)
    case.add("lipfast op", lambda: ops.subspace_iteration(*args),
             f"{sweeps} sweeps, block {pb}; {err(ops.subspace_iteration(*args)[1][0])}", check=check_S("lipfast op"))
    case.add("reference", lambda: reference.subspace_iteration(*args), f"Householder QR; {err(Sr[0])}")
    case.add_compiled("reference + compile", reference.subspace_iteration, args, check=check_S("reference + compile"))
    case.add("lipfast.spectrum (warm)", lambda: lipfast.spectrum(W1, k=K, state=prev),
             f"default tol: {warm.iters} sweeps, residual/σ1 {warm.residual / float(warm.sigma):.0e}; "
             f"{err(warm.sigma)}")
    if opts.quick:  # a full LAPACK SVD is the slowest row and says nothing a smoke test needs
        case.skipped.append(H.skipped(config, "torch.linalg.svd", "skipped in --quick"))
    else:
        case.add("torch.linalg.svd", lambda: torch.linalg.svd(W1, full_matrices=False), "full thin SVD (LAPACK)")
    case.add(f"torch.svd_lowrank q={pb}", lambda: torch.svd_lowrank(W1, q=pb, niter=2),
             f"niter=2, cold; {err(lowrank_s1)}")
    return case.run()


def run_contract(config, opts):
    dev, dt = config.device, config.dtype
    W = _linear_weight(64, 48, dev, torch.float64)  # the contraction only sees the [N, k] projections
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    E = torch.randn(config.params["N"], *W.shape, device=dev, dtype=torch.float64)
    x, y = E @ Vh[0], E.mT @ U[:, 0]
    args = ((x @ U[:, :K]).to(dt), (y @ Vh[:K].mT).to(dt), (x * x).sum(-1).to(dt), (y * y).sum(-1).to(dt),
            S[:K], float(S[K]))
    expected = reference.hessian_contract(*args)
    case = _Case(config, opts)
    case.add("lipfast op", lambda: ops.hessian_contract(*args), check=_parity(config, "lipfast op")(expected))
    case.add("reference", lambda: reference.hessian_contract(*args))
    case.add_compiled("reference + compile", reference.hessian_contract, args,
                      check=_parity(config, "reference + compile")(expected))
    return case.run()


def run_tail(config, opts):
    p, dev, dt = config.params, config.device, config.dtype
    m, n = p["m"], p["n"]
    W0 = _linear_weight(m, n, dev, torch.float64)
    if p["spectrum"] == "trained":  # the same vectors, σ1 clear of a tail at 0.8 σ1 and below
        U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
        S = torch.cat([S[:1], S[1:] / S[1] * 0.8 * S[0]])
        W0 = (U * S) @ Vh
    W0 = W0.to(dt)
    spec = _setup_spectrum(W0)
    W1 = W0 + 1e-3 * W0.abs().mean() * torch.randn_like(W0)  # one small SGD-like step later
    dW = (W1 - W0).to(torch.float64)
    x, y = dW @ spec.V64[:, 0], dW.mT @ spec.U64[:, 0]
    args = (W1, x, y, spec.U, spec.S, spec.V, float(spec.sigma_next))
    out, want = ops.hessian_tail(*args), reference.hessian_tail(*args)
    H.assert_close(out, want, **PARITY[dt], what=f"{config.name}: lipfast op")
    note = f"{int(out[3])} CG steps, bracket ±{float(out[2] - out[1]) / 2 / float(out[0]):.0e}; R/σ1 was {float(out[4]) / float(spec.S[0]) / float(out[0]):.2f}× it"
    track = (W1, spec.basis, spec.U, spec.S, spec.V, float(spec.sigma_next), spec.Wt_u1, 16, 1e-4, False)
    case = _Case(config, opts)
    case.add("lipfast op", lambda: ops.hessian_tail(*args), note)
    case.add("track_update (runs it)", lambda: ops.track_update(*track), "16-sweep budget, tol 1e-4")
    case.add("reference", lambda: reference.hessian_tail(*args))
    return case.run()


def _hessian_form_reference(spec, E):
    """``lipfast.hessian_form``'s route with the reference contraction (float64 throughout)."""
    E64 = E.to(torch.float64)
    U, V = spec.U.to(torch.float64), spec.V.to(torch.float64)
    x, y = E64 @ V[:, 0], E64.mT @ U[:, 0]
    out = reference.hessian_contract((x @ U)[None], (y @ V)[None], (x @ x)[None], (y @ y)[None], spec.S,
                                     float(spec.sigma_next))
    return tuple(t[0] for t in out)


def run_hessian_form(config, opts):
    p, dev, dt = config.params, config.device, config.dtype
    W = _linear_weight(p["m"], p["n"], dev, dt)
    spec = _setup_spectrum(W)
    E = torch.randn(p["m"], p["n"], device=dev, dtype=dt) * 1e-3
    expected = _hessian_form_reference(spec, E)
    case = _Case(config, opts)
    case.add("lipfast.hessian_form", lambda: lipfast.hessian_form(spec, E), "checks + float64 projections + op",
             check=lambda h: _parity(config, "lipfast.hessian_form")(expected)((h.value, h.lo, h.hi)))
    case.add("reference route", lambda: _hessian_form_reference(spec, E), "same, reference.hessian_contract")
    if opts.quick:
        case.skipped.append(H.skipped(config, "reference.hessian_form_dense", "skipped in --quick"))
    else:
        def check_dense(exact):  # the truncation bracket of the k = 8 spectrum holds the exact value
            exact, slack = float(exact), 1e-9 * abs(float(exact))
            assert float(expected[1]) - slack <= exact <= float(expected[2]) + slack, (expected, exact)
        case.add("reference.hessian_form_dense", lambda: reference.hessian_form_dense(W, E),
                 "full SVD + all r terms: the ground truth", check=check_dense)
    return case.run()


RUNNERS = {"tail": run_tail, "persample": run_persample, "persample_sums": run_persample_sums, "conv": run_conv,
           "spectrum": run_spectrum, "contract": run_contract, "hessian_form": run_hessian_form}


class _Opts:
    def __init__(self, args, min_run_time):
        self.quick = args.quick
        self.compile = not (args.quick or args.no_compile)
        self.why_no_compile = "skipped in --quick" if args.quick else "skipped (--no-compile)"
        self.min_run_time = min_run_time
        self.rounds = 3 if args.quick else 9
        self.warmup = 1 if args.quick else 2


def main(argv=None) -> int:
    parser = H.make_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    device, dtype, min_run_time = H.setup(args)
    opts = _Opts(args, min_run_time)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    for line in H.environment_lines(device, {"dtype": str(dtype).replace("torch.", ""), "k": K,
                                             "timing": f"{opts.rounds} interleaved rounds, "
                                                       f"~{min_run_time} s per implementation"}):
        print(line)
    results = []
    for config in get_configs(device, dtype, args.quick):
        results += RUNNERS[config.params["kind"]](config, opts)
    print()
    print(H.format_table(results, baseline=("lipfast op", "lipfast.hessian_form")))
    print()
    print("× base: median / median of the case's first row (the compiled op, or lipfast.hessian_form); "
          f"> 1 is slower. Total {time.perf_counter() - t0:.1f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
