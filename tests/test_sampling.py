"""Sampling schemes (lipfast.data.batch_at, TrainConfig.sampling) and the SDE noise model that follows
them (lipfast.sde noise='independent' | 'epoch'), checked against a Monte Carlo of each scheme."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lipfast import analysis, data, runio, sde
from lipfast.train import ConfigError, TrainConfig, train

# ----------------------------------------------------------------------------------------------
# The sampler
# ----------------------------------------------------------------------------------------------


def test_permutation_covers_each_epoch_exactly_once():
    n, B = 103, 10  # 10 batches per epoch, 3 samples left out each epoch
    for epoch in range(3):
        idx = torch.cat([data.batch_at(n, B, step=epoch * 10 + k, seed=4, sampling="permutation") for k in range(10)])
        assert idx.numel() == 100 and idx.unique().numel() == 100  # no index twice within an epoch
        assert torch.equal(idx, torch.cat(data.batches(n, B, seed=4, epoch=epoch, drop_last=True)))


def test_replacement_batches_are_independent_uniform_draws():
    n, B, T = 50, 5, 4000
    idx = torch.stack([data.batch_at(n, B, step=t, seed=1, sampling="replacement") for t in range(T)])
    assert idx.shape == (T, B) and idx.min() >= 0 and idx.max() < n
    # Uniform: each index ~ T*B/n times (chi-square with n-1 dof, mean 49, sd ~10).
    counts = torch.bincount(idx.flatten(), minlength=n).double()
    expected = T * B / n
    assert float(((counts - expected) ** 2 / expected).sum()) < 100
    # Independent across steps (no epoch structure): the overlap of consecutive batches has the mean
    # of independent draws, B*B/n, where a permutation epoch would give 0; and duplicates within a batch
    # occur at the i.i.d. rate.
    overlap = np.mean([np.isin(idx[t].numpy(), idx[t + 1].numpy()).sum() for t in range(T - 1)])
    p_hit = 1 - (1 - 1 / n) ** B
    assert overlap == pytest.approx(B * p_hit, rel=0.1)
    dup = np.mean([B - idx[t].unique().numel() for t in range(T)])
    assert dup == pytest.approx(B - n * (1 - (1 - 1 / n) ** B), rel=0.15)
    # Same (seed, step) -> same batch; another seed -> another stream.
    assert torch.equal(idx[7], data.batch_at(n, B, step=7, seed=1, sampling="replacement"))
    assert not torch.equal(idx[7], data.batch_at(n, B, step=7, seed=2, sampling="replacement"))


@pytest.mark.parametrize("kw, match", [
    (dict(sampling="bootstrap"), "sampling must be one of"),
    (dict(step=-1), "step must be"),
    (dict(batch_size=60), "batch_size must be"),
    (dict(seed=-2), "seed must be"),
])
def test_batch_at_rejects_bad_input_naming_it(kw, match):
    args = dict(n=50, batch_size=5, step=0, seed=0, sampling="replacement")
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        data.batch_at(args.pop("n"), args.pop("batch_size"), **args)


@pytest.mark.parametrize("name, value, match", [
    ("sampling", "shuffle", "sampling must be one of"),
    ("sampling_seed", -1, "sampling_seed must be"),
])
def test_config_rejects_bad_sampling_options(name, value, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_mapping({name: value})


# ----------------------------------------------------------------------------------------------
# The SDE noise model per scheme, against a Monte Carlo of the scheme on a toy quadratic loss
# ----------------------------------------------------------------------------------------------

N, B, ETA_H, T, R = 40, 4, 5e-4, 30, 6000  # 10 batches per epoch, 3 epochs, R repetitions


def _toy_monte_carlo(scheme: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SGD on L(w) = (1/N) sum_i h/2 (w - a_i)^2 under the scheme, R runs: (mean[T+1], var[T+1],
    the per-step diffusion_var of w the tracker's formula gives)."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=N)
    a -= a.mean()
    M = N // B
    w = np.ones(R)
    traj = [w.copy()]
    order = None
    for t in range(T):
        if scheme == "replacement":
            batch = rng.integers(0, N, size=(R, B))
        else:
            if t % M == 0:
                order = np.argsort(rng.random((R, N)), axis=1)
            batch = order[:, (t % M) * B:(t % M + 1) * B]
        w = w - ETA_H * (w - a[batch].mean(axis=1))
        traj.append(w.copy())
    traj = np.array(traj)
    pop_var = a.var()  # Σ_1 of the toy (ddof 0: the population)
    fpc = (N - B) / (N - 1) if scheme == "permutation" else 1.0
    v = np.full(T, ETA_H**2 * pop_var / B * fpc)
    return traj.mean(axis=1), traj.var(axis=1, ddof=1), v


@pytest.mark.parametrize("scheme, noise", [("replacement", "independent"), ("permutation", "epoch")])
def test_noise_model_matches_a_monte_carlo_of_the_scheme(scheme, noise):
    _, mc_var, v = _toy_monte_carlo(scheme)
    kw = dict(per_epoch=N // B, rho=sde.epoch_correlation(B, N)) if noise == "epoch" else {}
    pred = sde.noise_variance(v, noise=noise, **kw)
    scale = pred.max()
    # MC error of a variance with R runs ~ sqrt(2/R) = 1.8%; the contraction (1 - eta*h)^t the recorded-
    # coefficient SDE leaves out is < 3% over T steps.
    np.testing.assert_allclose(mc_var, pred, rtol=0.08, atol=0.03 * scale)
    band = sde.simulate_recorded(1.0, np.zeros(T), np.zeros(T), v, n_paths=20000, seed=3, noise=noise, **kw)
    np.testing.assert_allclose(band.std**2, pred, rtol=0.06, atol=1e-3 * scale)
    if noise == "epoch":
        # What the SDE assumed before: independent batches overstate the permutation run's spread
        # at every epoch's end by far (its noise sums to zero there).
        wrong = sde.noise_variance(v, noise="independent")
        assert mc_var[N // B] < 0.05 * wrong[N // B] and mc_var[-1] < 0.05 * wrong[-1]
        assert pred[N // B] == pytest.approx(0, abs=1e-12 * scale)


def test_epoch_noise_variance_closed_form_and_phase():
    v = np.full(12, 2.0)
    M = 4
    out = sde.noise_variance(v, noise="epoch", per_epoch=M)
    k = np.arange(13) % M
    np.testing.assert_allclose(out, 2.0 * k * (M - k) / (M - 1), atol=1e-12)
    shifted = sde.noise_variance(v, noise="epoch", per_epoch=M, phase=1)
    # Step 0 is the 2nd batch of its epoch: after the 3 remaining ones the noise is minus the unseen
    # first batch's (variance v), and the next epoch starts afresh.
    np.testing.assert_allclose(shifted[:5], [0, 2.0, 2.0 * 2 * 2 / 3, 2.0, 2.0 + 2.0], atol=1e-12)


def test_epoch_simulation_is_chunk_invariant_and_independent_stays_as_before(monkeypatch):
    v = np.linspace(0.5, 1.5, 23)
    kw = dict(n_paths=64, seed=5, noise="epoch", per_epoch=5, phase=2)
    big = sde.simulate_recorded(0.0, np.zeros(23), np.zeros(23), v, **kw)
    monkeypatch.setattr(sde, "_CHUNK_BYTES", 24 * 64 * 3)  # 3 rows -> one epoch per chunk
    small = sde.simulate_recorded(0.0, np.zeros(23), np.zeros(23), v, **kw)
    np.testing.assert_array_equal(big.lo, small.lo)
    np.testing.assert_array_equal(big.std, small.std)
    ind = sde.simulate_recorded(0.0, np.zeros(23), np.zeros(23), v, n_paths=64, seed=5)
    ind2 = sde.simulate_recorded(0.0, np.zeros(23), np.zeros(23), v, n_paths=64, seed=5, noise="independent")
    np.testing.assert_array_equal(ind.hi, ind2.hi)


@pytest.mark.parametrize("kw, match", [
    (dict(noise="colored"), "noise must be one of"),
    (dict(noise="epoch"), "per_epoch must be"),
    (dict(noise="epoch", per_epoch=4, rho=-0.5), "rho must be in"),
    (dict(noise="epoch", per_epoch=4, phase=4), "phase must be"),
])
def test_noise_model_rejects_bad_options_naming_them(kw, match):
    with pytest.raises(ValueError, match=match):
        sde.simulate_recorded(0.0, np.zeros(3), np.zeros(3), np.ones(3), n_paths=4, **kw)
    with pytest.raises(ValueError, match=match):
        sde.noise_variance(np.ones(3), **kw)


# ----------------------------------------------------------------------------------------------
# Runs: the scheme is used, recorded, and picks the simulation's noise model
# ----------------------------------------------------------------------------------------------

TINY = dict(dataset="digits", n_samples=200, batch_size=32, widths=(8,), rank=2, steps=6,
            checkpoint_every=100, eval_every=100, sde_paths=32)


@pytest.mark.parametrize("sampling, noise", [("replacement", "independent"), ("permutation", "epoch")])
def test_run_records_its_sampling_and_the_simulation_follows_it(tmp_path, sampling, noise):
    out = train(TrainConfig(**TINY, sampling=sampling, sampling_seed=3), tmp_path / sampling, quiet=True,
                report=False)
    run = runio.load_run(out)
    assert run.summary["sampling"] == {"scheme": sampling, "seed": 3, "batch_size": 32, "steps_per_epoch": 5}
    sim = analysis.write_simulation(out, n_paths=16)
    assert sim["noise_model"]["noise"] == noise and noise in runio.read_summary(out)["sde"]["noise_model"]["noise"]
    assert "Noise model" in sim["method"]
    forced = analysis.simulate_run(out, n_paths=16, noise="independent")
    assert forced["noise_model"]["noise"] == "independent"


def test_sampling_seed_changes_only_the_batches(tmp_path):
    a = runio.load_run(train(TrainConfig(**TINY), tmp_path / "a", quiet=True, report=False))
    b = runio.load_run(train(TrainConfig(**TINY, sampling_seed=0), tmp_path / "b", quiet=True, report=False))
    c = runio.load_run(train(TrainConfig(**TINY, sampling_seed=1), tmp_path / "c", quiet=True, report=False))
    # Unset sampling_seed means data_seed (0): the same run; another sampling seed: same start, other path.
    assert [r["loss"] for r in a.network] == [r["loss"] for r in b.network]
    assert a.network[0]["log_bound"] == c.network[0]["log_bound"]
    assert a.summary["n_train"] == c.summary["n_train"]
    assert [r["loss"] for r in a.network][1:] != [r["loss"] for r in c.network][1:]
    assert math.isfinite(c.network[-1]["log_bound_next"])
