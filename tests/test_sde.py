"""lipfast.sde: contracts, shapes, reproducibility, and moments against closed-form solutions.

Statistical checks use a tolerance of 5 standard errors derived from the sample size; seeds are
fixed, so every test is deterministic. Convergence orders live in bench/sde_orders.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from lipfast import sde

F64 = torch.float64
N_SE = 5.0  # tolerance in standard errors


def _assert_mean(samples: torch.Tensor, expected: float, var: float, what: str) -> None:
    """Sample mean of ``samples`` (any shape, all draws of one quantity) within N_SE of ``expected``."""
    n = samples.numel()
    se = math.sqrt(var / n)
    got = samples.mean().item()
    assert abs(got - expected) <= N_SE * se, f"{what}: mean {got} vs {expected} (SE {se})"


def _assert_var(samples: torch.Tensor, expected: float, what: str) -> None:
    """Sample variance within N_SE of ``expected`` (Gaussian SE ``var·sqrt(2/(n−1))``)."""
    n = samples.numel()
    se = expected * math.sqrt(2.0 / (n - 1))
    got = samples.var().item()
    assert abs(got - expected) <= N_SE * se, f"{what}: var {got} vs {expected} (SE {se})"


# ---------------------------------------------------------------------------------------------
# select and the solver contracts
# ---------------------------------------------------------------------------------------------


def test_select_returns_declared_solvers():
    euler, milstein = sde.select("euler"), sde.select("milstein")
    assert euler is sde.EulerMaruyama and milstein is sde.Milstein
    assert (euler.strong_order, euler.weak_order) == (0.5, 1.0)
    assert (milstein.strong_order, milstein.weak_order) == (1.0, 1.0)
    assert euler.sde_type == milstein.sde_type == "ito"
    assert set(euler.noise_types) == {"diagonal", "scalar", "general"}
    assert set(milstein.noise_types) == {"diagonal", "scalar"}


def test_select_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown method 'rk4'; valid methods: \['euler', 'milstein'\]"):
        sde.select("rk4")


def test_solver_rejects_unsupported_noise_type():
    with pytest.raises(ValueError, match=r"Milstein: noise_type 'general' is not supported.*'diagonal', 'scalar'"):
        sde.Milstein(lambda t, x: x, lambda t, x: x, "general")


def test_milstein_step_matches_closed_form_correction():
    # diagonal noise g_i(x) = sin(x_i): the correction is ½ sin(x) cos(x) (dW² − dt)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=gen, dtype=F64)
    dW = 0.1 * torch.randn(5, 3, generator=gen, dtype=F64)
    dt = 0.01
    step = sde.Milstein(lambda t, y: -y, lambda t, y: torch.sin(y), "diagonal").step(0.0, dt, x, dW)
    expected = x - x * dt + torch.sin(x) * dW + 0.5 * torch.sin(x) * torch.cos(x) * (dW * dW - dt)
    torch.testing.assert_close(step, expected, rtol=1e-14, atol=1e-14)
    euler = sde.EulerMaruyama(lambda t, y: -y, lambda t, y: torch.sin(y), "diagonal").step(0.0, dt, x, dW)
    torch.testing.assert_close(euler, x - x * dt + torch.sin(x) * dW, rtol=1e-14, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# sdeint contract errors
# ---------------------------------------------------------------------------------------------


def _f(t, x):
    return -x


def _g(t, x):
    return 0.5 * torch.ones_like(x)


def _good():
    return dict(f=_f, g=_g, x0=torch.zeros(3, 2, dtype=F64), ts=[0.0, 0.5, 1.0])


def _g_general(t, x):
    return torch.ones(x.shape[0], x.shape[1], 4, dtype=x.dtype)


CONTRACT_CASES = [
    ("unknown method", dict(method="rk4"), r"unknown method 'rk4'"),
    ("unknown noise", dict(noise_type="additive"), r"unknown noise_type 'additive'.*'diagonal', 'scalar', 'general'"),
    (
        "noise unsupported",
        dict(method="milstein", noise_type="general", g=_g_general),
        r"method 'milstein' does not support noise_type 'general'; it supports \['diagonal', 'scalar'\]",
    ),
    ("x0 not tensor", dict(x0=[[0.0, 0.0]]), r"x0 must be a torch.Tensor of shape \[P, d\], got list"),
    ("x0 1-D", dict(x0=torch.zeros(3, dtype=F64)), r"x0 must have shape \[P, d\] \(2-D\), got shape \(3,\)"),
    ("x0 3-D", dict(x0=torch.zeros(3, 2, 1, dtype=F64)), r"got shape \(3, 2, 1\)"),
    ("x0 int", dict(x0=torch.zeros(3, 2, dtype=torch.int64)), r"floating-point dtype, got torch.int64"),
    (
        "x0 nan",
        dict(x0=torch.tensor([[0.0, float("nan")], [0.0, 0.0], [float("inf"), 0.0]])),
        r"x0 must be finite, got 2 NaN/Inf",
    ),
    ("ts repeated", dict(ts=[0.0, 1.0, 1.0]), r"strictly increasing, got ts\[1\]=1.0 followed by ts\[2\]=1.0"),
    (
        "ts decreasing",
        dict(ts=torch.tensor([0.0, 2.0, 1.0])),
        r"strictly increasing, got ts\[1\]=2.0 followed by ts\[2\]=1.0",
    ),
    ("ts 2-D", dict(ts=[[0.0, 1.0]]), r"ts must be 1-D with at least one time, got shape \(1, 2\)"),
    ("ts empty", dict(ts=[]), r"ts must be 1-D with at least one time, got shape \(0,\)"),
    ("ts nan", dict(ts=[0.0, float("nan")]), r"ts must be finite"),
    ("ts junk", dict(ts="abc"), r"ts must be a 1-D sequence of times, got 'abc'"),
    ("dt zero", dict(dt=0.0), r"dt must be None or a finite number > 0, got 0.0"),
    ("dt negative", dict(dt=-0.1), r"dt must be None or a finite number > 0, got -0.1"),
    ("dt nan", dict(dt=float("nan")), r"dt must be None or a finite number > 0, got nan"),
    ("dt bool", dict(dt=True), r"dt must be None or a finite number > 0, got True"),
    ("generator and seed", dict(generator=torch.Generator(), seed=1), r"either generator or seed, not both"),
    ("generator type", dict(generator=3), r"generator must be a torch.Generator, got int"),
    ("seed type", dict(seed=1.5), r"seed must be an int, got 1.5"),
    (
        "f shape",
        dict(f=lambda t, x: x[:, 0]),
        r"f\(t, x\) must return a tensor of shape \[P, d\] = \[3, 2\], got \(3,\)",
    ),
    ("f type", dict(f=lambda t, x: 1.0), r"f\(t, x\) must return a tensor .*got float"),
    (
        "g shape",
        dict(g=lambda t, x: x[:, :1]),
        r"g\(t, x\) must return a tensor of shape \[P, d\] = \[3, 2\] for diagonal noise, got \(3, 1\)",
    ),
    ("g scalar shape", dict(noise_type="scalar", g=lambda t, x: x[:, :1]), r"for scalar noise, got \(3, 1\)"),
    (
        "g general 2-D",
        dict(noise_type="general"),
        r"\[P, d, m\] = \[3, 2, m\] with m >= 1 for general noise, got \(3, 2\)",
    ),
]


@pytest.mark.parametrize("case, change, match", CONTRACT_CASES, ids=[c[0] for c in CONTRACT_CASES])
def test_contract_errors(case, change, match):
    kwargs = {**_good(), **change}
    with pytest.raises(ValueError, match=match):
        sde.check_contract(kwargs.pop("f"), kwargs.pop("g"), kwargs.pop("x0"), kwargs.pop("ts"), **kwargs)
    kwargs = {**_good(), **change}
    with pytest.raises(ValueError, match=match):  # sdeint checks up front, through the same function
        sde.sdeint(kwargs.pop("f"), kwargs.pop("g"), kwargs.pop("x0"), kwargs.pop("ts"), **kwargs)


def test_good_contract_returns_plan():
    solver, times, bshape = sde.check_contract(**_good(), method="milstein", noise_type="scalar")
    assert solver is sde.Milstein and times == [0.0, 0.5, 1.0] and bshape == (3, 1)
    _, _, bshape = sde.check_contract(**{**_good(), "g": _g_general}, noise_type="general")
    assert bshape == (3, 4)


def test_sdeint_rejects_unknown_kwargs():
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['bm', 'dtt'\]"):
        sde.sdeint(**_good(), dtt=0.1, bm=None)


# ---------------------------------------------------------------------------------------------
# shapes, grid, reproducibility
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, noise_type",
    [
        ("euler", "diagonal"),
        ("euler", "scalar"),
        ("euler", "general"),
        ("milstein", "diagonal"),
        ("milstein", "scalar"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(0, 3), (1, 1), (7, 5)])
def test_sdeint_output_shape(method, noise_type, dtype, shape):
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    if noise_type == "general":
        G = torch.randn(shape[1], 2, dtype=dtype)

        def g(t, x):
            return torch.tanh(x).unsqueeze(-1) * G
    else:

        def g(t, x):
            return 0.3 * torch.cos(x)

    ts = torch.tensor([0.0, 0.1, 0.25, 0.3])
    out = sde.sdeint(lambda t, x: -x, g, x0, ts, method=method, dt=0.02, noise_type=noise_type, seed=0)
    assert out.shape == (4, *shape) and out.dtype == dtype
    assert torch.equal(out[0], x0)
    assert bool(torch.isfinite(out).all())
    if out.numel():
        assert not torch.equal(out[1], out[0])


def test_sdeint_step_grid_hits_output_times():
    seen: list[float] = []

    def f(t, x):
        seen.append(t)
        return torch.zeros_like(x)

    sde.sdeint(f, _g, torch.zeros(2, 1, dtype=F64), [0.0, 0.3, 1.0], dt=0.1, seed=0)
    steps = seen[1:]  # the first call is check_contract's shape probe
    np.testing.assert_allclose(steps, np.arange(10) / 10, rtol=0, atol=1e-12)  # 3 + 7 steps of 0.1
    seen.clear()
    sde.sdeint(f, _g, torch.zeros(2, 1, dtype=F64), [0.0, 0.3, 1.0], dt=0.25, seed=0)
    # 0.3/0.25 -> 2 steps of 0.15, 0.7/0.25 -> 3 steps of 0.7/3: equal steps, each <= dt
    np.testing.assert_allclose(seen[1:], [0.0, 0.15, 0.3, 0.3 + 0.7 / 3, 0.3 + 1.4 / 3], atol=1e-12)
    seen.clear()
    sde.sdeint(f, _g, torch.zeros(2, 1, dtype=F64), [0.0, 0.3, 1.0], seed=0)
    assert seen[1:] == [0.0, 0.3]


def test_sdeint_single_time_returns_x0():
    x0 = torch.randn(4, 2, dtype=F64)
    out = sde.sdeint(_f, _g, x0, [0.5], seed=0)
    assert out.shape == (1, 4, 2) and torch.equal(out[0], x0)


@pytest.mark.parametrize("method", ["euler", "milstein"])
def test_sdeint_seeded_reproducibility(method):
    args = (lambda t, x: 0.1 * x, lambda t, x: 0.2 * x, torch.ones(64, 3, dtype=F64), [0.0, 0.5, 1.0])
    torch.manual_seed(123)
    before = torch.rand(3)
    a = sde.sdeint(*args, method=method, dt=0.05, seed=7)
    torch.manual_seed(123)
    b = sde.sdeint(*args, method=method, dt=0.05, seed=7)
    assert torch.equal(torch.rand(3), before)  # a seeded call leaves the global RNG alone
    c = sde.sdeint(*args, method=method, dt=0.05, generator=torch.Generator().manual_seed(7))
    d = sde.sdeint(*args, method=method, dt=0.05, seed=8)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, d)


def test_scalar_noise_shares_one_brownian_motion_per_path():
    x0 = torch.ones(500, 2, dtype=F64)
    args = (lambda t, x: 0.5 * x, lambda t, x: 0.4 * x, x0, [0.0, 1.0])
    scalar = sde.sdeint(*args, dt=0.1, noise_type="scalar", seed=0)
    assert torch.equal(scalar[..., 0], scalar[..., 1])
    diagonal = sde.sdeint(*args, dt=0.1, noise_type="diagonal", seed=0)
    assert not torch.equal(diagonal[..., 0], diagonal[..., 1])
    milstein = sde.sdeint(*args, dt=0.1, noise_type="scalar", method="milstein", seed=0)
    assert torch.equal(milstein[..., 0], milstein[..., 1])


# ---------------------------------------------------------------------------------------------
# moments against closed-form solutions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["euler", "milstein"])
def test_brownian_motion_with_drift_exact_moments(method):
    # dX = mu dt + s dW: Euler-Maruyama is exact in distribution, one step per interval.
    mu, s, x0v = 0.7, 1.3, 0.3
    out = sde.sdeint(
        lambda t, x: torch.full_like(x, mu),
        lambda t, x: torch.full_like(x, s),
        torch.full((20000, 2), x0v, dtype=F64),
        [0.0, 0.5, 2.0],
        method=method,
        seed=11,
    )
    for k, t in ((1, 0.5), (2, 2.0)):
        _assert_mean(out[k], x0v + mu * t, s * s * t, f"BM t={t}")
        _assert_var(out[k], s * s * t, f"BM t={t}")
    # Cov(X_0.5, X_2) = s² · 0.5: increments over disjoint intervals are independent
    a, b = out[1].flatten(), out[2].flatten()
    cov = ((a - a.mean()) * (b - b.mean())).mean().item()
    v1, v2, c = s * s * 0.5, s * s * 2.0, s * s * 0.5
    se = math.sqrt((v1 * v2 + c * c) / a.numel())
    assert abs(cov - c) <= N_SE * se


@pytest.mark.parametrize("method", ["euler", "milstein"])
def test_ornstein_uhlenbeck_exact_mean_and_variance(method):
    # dX = th (m − X) dt + s dW; X_T ~ N(m + (x0 − m) e^{−th T}, s²/(2 th) (1 − e^{−2 th T})).
    # Discretisation bias at dt = 1e-3: mean ≈ 4e-4 (0.1 SE), variance ≈ 1.6e-4 (0.1 SE).
    th, m, s, x0v, T = 2.0, 0.5, 0.8, 2.0, 1.0
    out = sde.sdeint(
        lambda t, x: th * (m - x),
        lambda t, x: torch.full_like(x, s),
        torch.full((8000, 2), x0v, dtype=F64),
        [0.0, T],
        method=method,
        dt=1e-3,
        seed=3,
    )
    mean = m + (x0v - m) * math.exp(-th * T)
    var = s * s / (2 * th) * (1 - math.exp(-2 * th * T))
    _assert_mean(out[-1], mean, var, "OU")
    _assert_var(out[-1], var, "OU")


@pytest.mark.parametrize("method", ["euler", "milstein"])
def test_geometric_brownian_motion_mean(method):
    # dX = mu X dt + s X dW: E[X_T] = x0 e^{mu T}; log X_T ~ N((mu − s²/2) T, s² T).
    # Discretisation bias at dt = 2e-3: E[X_T] ≈ 4e-4 (0.1 SE).
    mu, s, x0v, T = 0.5, 0.4, 1.0, 1.0
    out = sde.sdeint(
        lambda t, x: mu * x,
        lambda t, x: s * x,
        torch.full((8000, 2), x0v, dtype=F64),
        [0.0, T],
        method=method,
        dt=2e-3,
        seed=5,
    )
    xT = out[-1]
    var = x0v**2 * math.exp(2 * mu * T) * (math.exp(s * s * T) - 1)
    _assert_mean(xT, x0v * math.exp(mu * T), var, "GBM")
    _assert_mean(torch.log(xT), math.log(x0v) + (mu - s * s / 2) * T, s * s * T, "GBM log")
    _assert_var(torch.log(xT), s * s * T, "GBM log")


def test_general_noise_covariance():
    # dX = G dW with G [2, 3]: Cov(X_T) = G Gᵀ T.
    G = torch.tensor([[1.0, 0.5, 0.0], [-0.3, 0.2, 0.8]], dtype=F64)
    P, T = 20000, 1.5
    out = sde.sdeint(
        lambda t, x: torch.zeros_like(x),
        lambda t, x: G.expand(x.shape[0], 2, 3),
        torch.zeros(P, 2, dtype=F64),
        [0.0, T],
        dt=0.5,
        noise_type="general",
        seed=2,
    )
    x = out[-1]
    cov = (x.T @ x / P).numpy()  # mean is exactly 0
    sigma = (G @ G.T).numpy() * T
    se = np.sqrt((np.outer(np.diag(sigma), np.diag(sigma)) + sigma**2) / P)
    assert np.all(np.abs(cov - sigma) <= N_SE * se), (cov, sigma)


# ---------------------------------------------------------------------------------------------
# simulate_recorded
# ---------------------------------------------------------------------------------------------


def _coefficients(T=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1e-2, T), rng.uniform(0, 1e-3, T), rng.uniform(0, 4e-4, T)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_simulate_recorded_matches_closed_form(dtype):
    drift, ito, var = _coefficients()
    x0, n = 1.7, 20000
    band = sde.simulate_recorded(x0, drift, ito, var, n_paths=n, seed=0, quantiles=(0.05, 0.9), dtype=dtype)
    T = drift.shape[0]
    mean = x0 + np.concatenate(([0.0], np.cumsum(drift + ito)))
    sd = np.sqrt(np.concatenate(([0.0], np.cumsum(var))))
    for a in (band.mean, band.std, band.lo, band.hi):
        assert a.shape == (T + 1,) and a.dtype == np.float64
    assert band.mean[0] == band.lo[0] == band.hi[0] == x0 and band.std[0] == 0.0
    assert (band.n_paths, band.quantiles, band.n_fallback) == (n, (0.05, 0.9), 0)
    t = slice(1, None)
    assert np.all(np.abs(band.mean[t] - mean[t]) <= N_SE * sd[t] / math.sqrt(n))
    assert np.all(np.abs(band.std[t] ** 2 - sd[t] ** 2) <= N_SE * sd[t] ** 2 * math.sqrt(2 / (n - 1)))
    for q, got in ((0.05, band.lo), (0.9, band.hi)):
        z = NormalDist().inv_cdf(q)
        se = math.sqrt(q * (1 - q) / n) / NormalDist().pdf(z) * sd[t]
        assert np.all(np.abs(got[t] - (mean[t] + z * sd[t])) <= N_SE * se), q


def test_simulate_recorded_two_paths_statistics_are_exact():
    # With two paths a < b: mean = (a + b)/2, std (ddof=1) = (b − a)/√2, and the linear-interpolation
    # quantiles are a + q (b − a), so every statistic is pinned by lo and hi without sampling error.
    drift, ito, var = _coefficients(T=6)
    band = sde.simulate_recorded(0.3, drift, ito, var, n_paths=2, seed=0, quantiles=(0.1, 0.7))
    gap = (band.hi - band.lo) / 0.6
    a = band.lo - 0.1 * gap
    np.testing.assert_allclose(band.std, gap / math.sqrt(2), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(band.mean, a + gap / 2, rtol=1e-12, atol=1e-15)
    assert np.all(gap[1:] > 0)


def test_simulate_recorded_accepts_lists_and_tensors():
    drift, ito, var = _coefficients(T=12)
    ref = sde.simulate_recorded(0.5, drift, ito, var, n_paths=64, seed=4)
    other = sde.simulate_recorded(
        torch.tensor(0.5), drift.tolist(), torch.from_numpy(ito), torch.from_numpy(var), n_paths=64, seed=4
    )
    for k in ("mean", "std", "lo", "hi"):
        assert np.array_equal(getattr(ref, k), getattr(other, k))


def test_simulate_recorded_seeded_reproducibility():
    drift, ito, var = _coefficients(T=15)
    a = sde.simulate_recorded(0.0, drift, ito, var, n_paths=256, seed=9)
    b = sde.simulate_recorded(0.0, drift, ito, var, n_paths=256, seed=9)
    c = sde.simulate_recorded(0.0, drift, ito, var, n_paths=256, seed=10)
    for k in ("mean", "std", "lo", "hi"):
        assert np.array_equal(getattr(a, k), getattr(b, k))
    assert not np.array_equal(a.lo, c.lo)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_simulate_recorded_chunking_invariance(monkeypatch, dtype):
    drift, ito, var = _coefficients(T=23)
    n = 300
    whole = sde.simulate_recorded(0.2, drift, ito, var, n_paths=n, seed=1, dtype=dtype)
    for rows in (1, 4, 7):  # 23 steps in chunks of 1, 4 (last one short), 7 rows
        monkeypatch.setattr(sde, "_CHUNK_BYTES", 24 * n * rows)
        chunked = sde.simulate_recorded(0.2, drift, ito, var, n_paths=n, seed=1, dtype=dtype)
        for k in ("mean", "std", "lo", "hi"):
            assert np.array_equal(getattr(whole, k), getattr(chunked, k)), (rows, k)


def test_simulate_recorded_nan_steps_need_fallback():
    drift, ito, var = _coefficients(T=10)
    drift[3] = np.nan
    var[7] = np.nan
    with pytest.raises(ValueError, match=r"steps \[3, 7\] have NaN coefficients.*pass fallback="):
        sde.simulate_recorded(1.0, drift, ito, var)


def test_simulate_recorded_nan_steps_use_fallback():
    drift, ito, var = _coefficients(T=10)
    drift[3] = np.nan
    var[7] = np.nan
    fallback = np.full(10, np.nan)  # only read at the NaN steps
    fallback[[3, 7]] = [0.05, -0.02]
    n, x0 = 20000, 1.0
    band = sde.simulate_recorded(x0, drift, ito, var, fallback=fallback, n_paths=n, seed=2)
    assert band.n_fallback == 2
    nan = np.isnan(drift) | np.isnan(var)
    mu = np.where(nan, fallback, drift + ito)
    v = np.where(nan, 0.0, var)
    mean = x0 + np.concatenate(([0.0], np.cumsum(mu)))
    sd = np.sqrt(np.concatenate(([0.0], np.cumsum(v))))
    assert np.all(np.abs(band.mean[1:] - mean[1:]) <= N_SE * sd[1:] / math.sqrt(n))
    # a fallback step is deterministic: every path moves by the same amount
    for t in (3, 7):
        assert band.std[t + 1] == band.std[t]
        np.testing.assert_allclose(band.lo[t + 1] - band.lo[t], fallback[t], rtol=1e-9)
        np.testing.assert_allclose(band.hi[t + 1] - band.hi[t], fallback[t], rtol=1e-9)
    bad = fallback.copy()
    bad[7] = np.inf
    with pytest.raises(ValueError, match=r"fallback must be finite at the NaN steps, got NaN/Inf at steps \[7\]"):
        sde.simulate_recorded(x0, drift, ito, var, fallback=bad)


def test_simulate_recorded_negative_variance():
    drift, ito, var = _coefficients(T=10)
    zero = var.copy()
    zero[4] = 0.0
    rounding = var.copy()
    rounding[4] = -1e-20  # within 1e-12 · max|v|: clamped to 0
    a = sde.simulate_recorded(0.0, drift, ito, zero, n_paths=50, seed=0)
    b = sde.simulate_recorded(0.0, drift, ito, rounding, n_paths=50, seed=0)
    assert np.array_equal(a.std, b.std) and np.array_equal(a.lo, b.lo)
    var[5] = -1e-3
    with pytest.raises(ValueError, match=r"diffusion_var must be >= 0, got -0.001 at step 5"):
        sde.simulate_recorded(0.0, drift, ito, var)


def test_simulate_recorded_length_mismatch_names_arrays():
    drift, ito, var = _coefficients(T=10)
    match = r"drift, ito, diffusion_var must all have the same length T, got drift=10, ito=9, diffusion_var=10"
    with pytest.raises(ValueError, match=match):
        sde.simulate_recorded(0.0, drift, ito[:9], var)
    with pytest.raises(ValueError, match=r"got drift=10, ito=10, diffusion_var=10, fallback=11"):
        sde.simulate_recorded(0.0, drift, ito, var, fallback=np.zeros(11))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(n_paths=1), ValueError, r"n_paths must be >= 2"),
        (dict(n_paths=2.5), TypeError, r"n_paths must be an int >= 2, got 2.5"),
        (dict(quantiles=(0.95, 0.05)), ValueError, r"0 < q_lo < q_hi < 1, got \(0.95, 0.05\)"),
        (dict(quantiles=(0.0, 0.9)), ValueError, r"0 < q_lo < q_hi < 1"),
        (dict(quantiles=(0.1, 1.0)), ValueError, r"0 < q_lo < q_hi < 1"),
        (dict(quantiles=(0.5,)), ValueError, r"quantiles must be a pair"),
        (dict(dtype=torch.float16), ValueError, r"dtype must be torch.float64 or torch.float32, got torch.float16"),
        (dict(seed=-1), ValueError, r"seed must be >= 0, got -1"),
        (dict(seed="0"), TypeError, r"seed must be an int"),
        (dict(x0=float("nan")), ValueError, r"x0 must be finite"),
        (dict(x0="1"), ValueError, r"x0 must be a finite float"),
        (dict(drift=np.zeros((10, 1))), ValueError, r"drift must be 1-D, got shape \(10, 1\)"),
        (dict(ito=np.r_[np.zeros(9), np.inf]), ValueError, r"ito is infinite at steps \[9\]"),
    ],
)
def test_simulate_recorded_argument_errors(kwargs, exc, match):
    drift, ito, var = _coefficients(T=10)
    args = dict(x0=0.0, drift=drift, ito=ito, diffusion_var=var)
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
    with pytest.raises(exc, match=match):
        sde.simulate_recorded(args["x0"], args["drift"], args["ito"], args["diffusion_var"], **kwargs)


def test_band_coverage_known_cases():
    T = 10
    drift = np.full(T, 0.1)
    ito = np.full(T, 0.01)
    var = np.ones(T)
    band = sde.simulate_recorded(2.0, drift, ito, var, n_paths=4000, seed=0)
    mean = 2.0 + np.concatenate(([0.0], np.cumsum(drift + ito)))
    # the exact mean sits ~1.6 standard deviations inside a 90% band of width 3.3·sqrt(t)
    assert band.coverage(mean) == 1.0
    far = mean + 10.0 * np.sqrt(np.arange(T + 1))  # outside for every t >= 1, equal at t = 0
    assert band.coverage(far) == pytest.approx(1 / (T + 1))
    some = mean.copy()
    some[[2, 5, 9]] -= 50.0
    assert band.coverage(torch.from_numpy(some)) == pytest.approx(8 / 11)
    with pytest.raises(ValueError, match=r"observed must have length T\+1 = 11, got 10"):
        band.coverage(mean[:-1])
    some[4] = np.nan
    with pytest.raises(ValueError, match=r"observed must be finite, got NaN/Inf at \[4\]"):
        band.coverage(some)


def test_band_is_frozen_and_json_safe():
    drift, ito, var = _coefficients(T=5)
    band = sde.simulate_recorded(1.0, drift, ito, var, n_paths=32, seed=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        band.mean = np.zeros(6)
    with pytest.raises(ValueError, match="read-only"):
        band.mean[0] = 0.0
    d = json.loads(json.dumps(band.to_dict(), allow_nan=False))
    assert set(d) == {"mean", "std", "lo", "hi", "n_paths", "quantiles", "n_fallback"}
    assert d["mean"] == band.mean.tolist() and d["n_paths"] == 32 and d["quantiles"] == [0.05, 0.95]


def test_simulate_recorded_zero_steps():
    band = sde.simulate_recorded(3.0, [], [], [], n_paths=8)
    assert band.mean.tolist() == [3.0] and band.std.tolist() == [0.0] and band.coverage([3.0]) == 1.0


# ---------------------------------------------------------------------------------------------
# pathwise_residual
# ---------------------------------------------------------------------------------------------


def test_pathwise_residual_ignores_nan_pairs():
    pred = [1.0, np.nan, 2.0, 4.0]
    obs = np.array([1.5, 7.0, np.nan, 4.0])
    r = sde.pathwise_residual(pred, torch.from_numpy(obs))
    assert r == {
        "sum_pred": 5.0,
        "sum_obs": 5.5,
        "residual": -0.5,
        "relative_residual": pytest.approx(0.5 / 5.5, rel=1e-15),
        "n_ignored": 2,
        "n_used": 2,
    }
    zero = sde.pathwise_residual([1e-3, -1e-3], [0.0, 0.0])
    assert zero["relative_residual"] == 0.0 and zero["n_ignored"] == 0
    tiny = sde.pathwise_residual([1e-300], [0.0])
    assert tiny["relative_residual"] == pytest.approx(1e-300 / np.finfo(np.float64).tiny)


def test_pathwise_residual_errors():
    with pytest.raises(ValueError, match=r"same length, got 3 and 2"):
        sde.pathwise_residual([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match=r"delta_obs is infinite at steps \[1\]"):
        sde.pathwise_residual([1.0, 2.0], [1.0, np.inf])
