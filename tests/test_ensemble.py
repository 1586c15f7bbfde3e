"""lipfast ensemble: members that differ only in sampling, the observed/predicted mean and variance
files, the variance ratio and its χ² interval."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from lipfast import ensemble, runio
from lipfast.cli import main

ARGS = ["--dataset", "digits", "--n-samples", "200", "--widths", "8", "--rank", "2", "--steps", "8",
        "--batch-size", "16", "--sde-paths", "16", "--checkpoint-every", "1000", "--quiet"]


def test_ensemble_on_digits_writes_members_and_the_comparison(tmp_path, capsys):
    out = tmp_path / "ens"
    assert main(["ensemble", "--runs", "3", "--out", str(out), "--sampling", "replacement", *ARGS]) == 0
    printed = capsys.readouterr().out
    assert "var ratio observed/SDE" in printed and "independent" in printed
    members = [runio.load_run(out / "members" / f"{i:03d}") for i in range(3)]
    # Same initialisation and split, other batches: only sampling_seed differs.
    configs = [dict(m.config) for m in members]
    assert [c.pop("sampling_seed") for c in configs] == [0, 1, 2]
    assert configs[0] == configs[1] == configs[2]
    assert len({m.network[0]["log_bound"] for m in members}) == 1
    assert len({m.network[-1]["log_bound_next"] for m in members}) == 3
    info = json.loads((out / ensemble.ENSEMBLE_FILE).read_text())
    assert info["n_runs"] == 3 and info["noise_model"]["noise"] == "independent"
    assert set(info["series"]) == {"log K", "1", "3"}
    for st in info["series"].values():
        for which in ("own", "averaged"):
            r = st[which]
            assert math.isfinite(r["ratio"]) and r["interval"][0] < r["ratio"] < r["interval"][1]
    rows = list(csv.DictReader((out / ensemble.ENSEMBLE_CSV_FILE).read_text().splitlines()))
    assert len(rows) == 3 * 9 and rows[0]["obs_var"] == "0.0"
    logk = [r for r in rows if r["series"] == "log K"]
    obs = np.array([[m.network[t]["log_bound"] for t in range(8)] + [m.network[-1]["log_bound_next"]]
                    for m in members])
    np.testing.assert_allclose([float(r["obs_var"]) for r in logk], obs.var(axis=0, ddof=1), rtol=1e-12)
    assert (out / ensemble.ENSEMBLE_FIGURE_FILE).read_bytes()[:4] == b"\x89PNG"
    # A rerun reuses the finished members; permutation sampling is described as epoch noise.
    res = ensemble.summarize_ensemble(out, noise="epoch")
    assert res["noise_model"]["noise"] == "epoch" and res["noise_model"]["per_epoch"] == 160 // 16


def test_ensemble_rejects_bad_input_naming_it(tmp_path, capsys):
    assert main(["ensemble", "--runs", "1", "--out", str(tmp_path / "e"), *ARGS]) == 2
    assert "--runs must be >= 2" in capsys.readouterr().err
    assert main(["ensemble", "--runs", "2", "--jobs", "0", "--out", str(tmp_path / "e"), *ARGS]) == 2
    assert "--jobs must be >= 1" in capsys.readouterr().err
    assert main(["ensemble", "--runs", "2", "--every", "2", "--out", str(tmp_path / "e"), *ARGS]) == 2
    assert "every must be 1" in capsys.readouterr().err
    assert main(["ensemble", "--runs", "2", "--sampling", "bootstrap", "--out", str(tmp_path / "e"), *ARGS]) == 2
    assert "sampling must be one of" in capsys.readouterr().err


def test_variance_ratio_chi2_range_and_interval():
    r = ensemble.variance_ratio(np.array([0, 0, 2.0, 2.0]), np.array([0, 0, 1.0, 1.0]), 16)
    assert r["ratio"] == pytest.approx(2.0) and r["from_position"] == 2
    lo, hi = r["range_if_sde"]
    assert lo == pytest.approx(6.262 / 15, rel=1e-3) and hi == pytest.approx(27.488 / 15, rel=1e-3)
    assert not r["within"]
    assert r["interval"] == pytest.approx([2.0 / hi, 2.0 / lo])
