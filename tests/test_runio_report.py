"""Run folder writing/reading (runio), the SDE/pathwise analysis and the HTML report."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import struct
import sys

import pytest

from lipfast import analysis, report, runio

HOSTILE = "<script>alert(1)</script>"


# ----------------------------------------------------------------------------------------------
# A tiny fake "training": σ random walks with consistent records
# ----------------------------------------------------------------------------------------------


def fake_training(n_steps=30, layers=("fc1", "fc2"), *, seed=0, degenerate_at=(4, 17)):
    """(layer rows per step, network row per step) of a plausible run.

    Each layer's σ follows σ += drift + ito + sqrt(var)·z; the predicted change differs from
    the observed one by a small relative error; degenerate steps carry NaN terms.
    """
    rng = random.Random(seed)
    sigma = {name: 1.0 + 0.5 * i for i, name in enumerate(layers)}
    steps = []
    for step in range(n_steps):
        rows = []
        lb = lbn = n_drift = n_var = n_ito = 0.0
        for i, name in enumerate(layers):
            s = sigma[name]
            drift = rng.gauss(2e-3, 1e-3)
            var = (1e-2 * rng.uniform(0.5, 1.5)) ** 2
            ito = 1e-4 * rng.uniform(0.0, 1.0)
            s_next = s + drift + ito + math.sqrt(var) * rng.gauss(0.0, 1.0)
            delta = s_next - s
            first = delta * (1.0 + 1e-3 * rng.gauss(0.0, 1.0))
            second = 1e-6 * rng.uniform(-1.0, 1.0)
            degenerate = step in degenerate_at
            if degenerate:
                drift = var = ito = first = second = math.nan
            pred = first + second
            rows.append({
                "step": step, "layer": name, "kind": "linear", "m": 8 + i, "n": 5, "batch": 16,
                "lr": 0.1, "sigma": s, "sigma2": 0.7 * s, "sigma_next": s_next,
                "delta_obs": delta, "first_order": first, "second_order": second,
                "delta_pred": pred, "drift": drift, "diffusion_var": var, "ito": ito,
                "ito_lo": ito * 0.9, "ito_hi": ito * 1.1,
                "gap": 1e-5 if degenerate else 0.3 + 0.01 * rng.random(),
                "degenerate": degenerate, "residual": delta - pred, "sigma_err": 1e-7 * s, "nonfinite": False,
                "flag_names": "degenerate" if degenerate else "", "group": -1,
                "shared_with": "emb" if name == "fc1" else "",
            })  # fmt: skip
            lb += math.log(s)
            lbn += math.log(s_next)
            n_drift += drift / s
            n_var += var / s**2
            n_ito += ito / s - var / (2 * s**2)
            sigma[name] = s_next
        net = {
            "step": step, "log_bound": lb, "log_bound_next": lbn, "drift": n_drift,
            "diffusion_var": n_var, "ito": n_ito, "loss": 2.0 * math.exp(-step / 20),
            "train_acc": None if step % 7 == 3 else min(1.0, 0.1 + step / n_steps),
        }  # fmt: skip
        steps.append((rows, net))
    return steps


CONFIG = {"model": "mlp", "lr": 0.1, "batch": 16, "dataset": "digits", "widths": [8, 9]}


def write_run(path, steps, config=CONFIG, **kw):
    with runio.RunWriter(path, config, **kw) as w:
        for rows, net in steps:
            w.write_layers(rows)
            w.write_network(net)
        w.write_summary({"final_loss": steps[-1][1]["loss"], "steps": len(steps)})
    return path


def same_float(a, b):
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return struct.pack("<d", a) == struct.pack("<d", b)


def assert_rows_equal(got, want, columns):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert list(g) == columns
        for c in columns:
            wv = w[c]
            if c in ("step", "m", "n", "batch", "group"):
                assert type(g[c]) is int and g[c] == wv
            elif c in ("degenerate", "nonfinite"):
                assert type(g[c]) is bool and g[c] == wv
            elif c in ("layer", "kind", "flag_names", "shared_with"):
                assert g[c] == wv
            else:
                assert type(g[c]) is float
                assert same_float(g[c], math.nan if wv is None else float(wv)), (c, g[c], wv)


@pytest.fixture(scope="module")
def steps():
    return fake_training()


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory):
    """A run with a hostile layer name and config value, simulated and reported once."""
    path = tmp_path_factory.mktemp("rep") / "run"
    config = dict(CONFIG, dataset='<img src=x onerror="alert(2)">', note="a & b")
    write_run(path, fake_training(n_steps=25, layers=("fc1", HOSTILE, "cost$5$")), config)
    analysis.write_simulation(path, n_paths=256, seed=1)
    out = report.make_report(path)
    return path, out


# ----------------------------------------------------------------------------------------------
# runio: writing and reading
# ----------------------------------------------------------------------------------------------


def test_round_trip_is_exact(tmp_path, steps):
    path = write_run(tmp_path / "run", steps)
    run = runio.load_run(path)
    assert run.path == path
    assert run.config == CONFIG
    assert run.meta["schema_version"] == runio.SCHEMA_VERSION == 1
    assert run.dropped_lines == 0
    assert run.layer_names == ["fc1", "fc2"]
    assert_rows_equal(run.layers, [r for rows, _ in steps for r in rows], runio.LAYER_COLUMNS)
    assert_rows_equal(run.network, [n for _, n in steps], runio.NETWORK_COLUMNS)
    assert run.summary == {"final_loss": steps[-1][1]["loss"], "steps": len(steps)}
    header = (path / "layers.csv").read_text().split("\n", 1)[0]
    assert header == ",".join(runio.LAYER_COLUMNS)
    assert (path / "network.csv").read_text().split("\n", 1)[0] == ",".join(runio.NETWORK_COLUMNS)


def test_to_pandas(tmp_path, steps):
    pytest.importorskip("pandas")
    lf, nf = runio.load_run(write_run(tmp_path / "run", steps[:5])).to_pandas()
    assert list(lf.columns) == runio.LAYER_COLUMNS and len(lf) == 10
    assert list(nf.columns) == runio.NETWORK_COLUMNS and len(nf) == 5


def test_bad_rows_are_rejected_and_nothing_written(tmp_path, steps):
    rows, net = steps[0]
    with runio.RunWriter(tmp_path / "run", CONFIG) as w:
        bad = [dict(rows[0]), {k: v for k, v in rows[1].items() if k != "gap"}]
        bad[0]["colour"] = "red"
        with pytest.raises(ValueError, match=r"missing \['gap'\]"):
            w.write_layers(bad[1:])
        with pytest.raises(ValueError, match=r"unknown \['colour'\]"):
            w.write_layers(rows[:1] + bad[:1])
        with pytest.raises(ValueError, match="'step' must be an integer"):
            w.write_network(dict(net, step=1.5))
        with pytest.raises(ValueError, match="line breaks"):
            w.write_layers([dict(rows[0], layer="a\nb")])
    run = runio.load_run(tmp_path / "run")
    assert run.layers == [] and run.network == []


def test_truncated_last_line_is_dropped_and_counted(tmp_path, steps):
    path = write_run(tmp_path / "run", steps[:6])
    with open(path / "layers.csv", "ab") as f:
        f.write(b"6,fc1,linear,8,5,16,0.1,1.01")  # killed mid-write
    with open(path / "network.csv", "ab") as f:
        f.write(b"6,0.0")
    run = runio.load_run(path)
    assert run.dropped_lines == 2
    assert [r["step"] for r in run.network] == list(range(6))
    assert_rows_equal(run.layers, [r for rows, _ in steps[:6] for r in rows], runio.LAYER_COLUMNS)
    assert "partial CSV line" in report.summary_table(run)


def test_resume_after_kill_equals_uninterrupted_run(tmp_path, steps):
    full = write_run(tmp_path / "full", steps)
    part = tmp_path / "part"
    with runio.RunWriter(part, CONFIG, fsync_every=3) as w:
        for rows, net in steps[:12]:  # the checkpoint is at step 9; steps 9..11 get redone
            w.write_layers(rows)
            w.write_network(net)
    with open(part / "layers.csv", "ab") as f:
        f.write(b"12,fc1,lin")
    created = json.loads((part / "config.json").read_text())["created"]

    with runio.RunWriter(part, CONFIG, resume=True) as w:
        assert w.truncate_to(9) == (6, 3)
        for rows, net in steps[9:]:
            w.write_layers(rows)
            w.write_network(net)
        w.write_summary({"final_loss": steps[-1][1]["loss"], "steps": len(steps)})
    for name in ("layers.csv", "network.csv", "summary.json"):
        assert (part / name).read_bytes() == (full / name).read_bytes(), name
    meta = json.loads((part / "config.json").read_text())
    assert meta["created"] == created and len(meta["resumed"]) == 1

    # resume_from_step does the same at construction
    with runio.RunWriter(part, CONFIG, resume=True, resume_from_step=3):
        pass
    assert [r["step"] for r in runio.load_run(part).network] == [0, 1, 2]


def test_refuses_a_folder_that_is_not_a_run(tmp_path, steps):
    path = tmp_path / "mine"
    path.mkdir()
    (path / "notes.txt").write_text("keep me")
    with pytest.raises(runio.RunFolderError, match="refusing.*not a lipfast run.*overwrite"):
        runio.RunWriter(path, CONFIG)
    with pytest.raises(runio.RunFolderError, match="cannot resume"):
        runio.RunWriter(path, CONFIG, resume=True)
    write_run(path, steps[:2], overwrite=True)
    assert (path / "notes.txt").read_text() == "keep me"
    assert len(runio.load_run(path).network) == 2
    assert issubclass(runio.RunFolderError, ValueError)


def test_existing_run_needs_overwrite_or_resume(tmp_path, steps):
    path = write_run(tmp_path / "run", steps[:4])
    (path / "figures").mkdir()
    (path / "figures" / "sigma.png").write_bytes(b"old")
    (path / "figures" / "mine.txt").write_text("user file")
    (path / "data.npz").write_bytes(b"user data")
    with pytest.raises(runio.RunFolderError, match="overwrite=True.*resume=True"):  # API words; the CLI says --overwrite
        runio.RunWriter(path, CONFIG)
    with pytest.raises(ValueError, match="mutually exclusive"):
        runio.RunWriter(path, CONFIG, overwrite=True, resume=True)
    with runio.RunWriter(path, {"other": 1}, overwrite=True):
        pass
    run = runio.load_run(path)
    assert run.layers == [] and run.network == [] and run.summary is None
    assert run.config == {"other": 1}
    assert not (path / "figures" / "sigma.png").exists()
    assert (path / "figures" / "mine.txt").exists() and (path / "data.npz").exists()


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing_folder", "does not exist"),
        ("missing_config", "config.json is missing"),
        ("invalid_json", "not valid JSON"),
        ("no_schema", "no schema_version"),
        ("future_schema", "schema_version 2.*upgrade lipfast"),
        ("bad_header", "unexpected CSV header"),
        ("bad_row", "line 3"),
    ],
)
def test_load_run_errors_are_one_clear_line(tmp_path, steps, case, match):
    path = write_run(tmp_path / "run", steps[:3])
    cfg = path / "config.json"
    if case == "missing_folder":
        path = tmp_path / "nowhere"
    elif case == "missing_config":
        cfg.unlink()
    elif case == "invalid_json":
        cfg.write_text('{"schema_version": 1,')
    elif case == "no_schema":
        cfg.write_text('{"config": {}}')
    elif case == "future_schema":
        meta = json.loads(cfg.read_text())
        cfg.write_text(json.dumps(dict(meta, schema_version=2)))
    elif case == "bad_header":
        text = (path / "network.csv").read_text()
        (path / "network.csv").write_text(text.replace("log_bound,", "logbound,", 1))
    elif case == "bad_row":
        lines = (path / "layers.csv").read_text().split("\n")
        lines[2] = lines[2].replace(",linear,", ",linear,x,", 1)
        (path / "layers.csv").write_text("\n".join(lines))
    with pytest.raises(runio.RunFolderError, match=match) as info:
        runio.load_run(path)
    assert "\n" not in str(info.value)


def test_summary_is_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "run"
    with runio.RunWriter(path, CONFIG) as w:
        w.write_summary({"a": 1, "nan": math.nan})
        assert runio.read_summary(path) == {"a": 1, "nan": None}
        before = (path / "summary.json").read_bytes()

        def failing_replace(src, dst):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(runio.os, "replace", failing_replace)
        with pytest.raises(OSError, match="summary.json.*No space left"):
            w.write_summary({"b": 2})
        monkeypatch.undo()
        with pytest.raises(ValueError, match="not JSON-serialisable"):
            w.write_summary({"b": object()})
        w.write_summary({"c": 3})  # merged over what is there
    assert (path / "summary.json").read_bytes() != before
    assert runio.read_summary(path) == {"a": 1, "nan": None, "c": 3}
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "layers.csv", "network.csv", "summary.json"
    ]  # fmt: skip


def test_failed_append_keeps_earlier_rows(tmp_path, steps, monkeypatch):
    path = tmp_path / "run"
    real_write = os.write
    with runio.RunWriter(path, CONFIG) as w:
        for rows, net in steps[:5]:
            w.write_layers(rows)
            w.write_network(net)

        def half_then_fail(fd, data):
            real_write(fd, bytes(data[: len(data) // 2]))  # a torn write ...
            raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full

        monkeypatch.setattr(runio.os, "write", half_then_fail)
        with pytest.raises(runio.RunWriteError, match=r"layers\.csv.*No space left") as info:
            w.write_layers(steps[5][0])
        assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
        monkeypatch.undo()
        run = runio.load_run(path)
        assert run.dropped_lines == 0
        assert [r["step"] for r in run.layers] == [s for s in range(5) for _ in range(2)]
        w.write_layers(steps[5][0])  # the writer is still usable
        w.write_network(steps[5][1])
    assert runio.load_run(path).layers[-1]["step"] == 5


def test_unwritable_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match=r"cannot create run folder .*file[/\\]run"):
        runio.RunWriter(blocker / "run", CONFIG)
    with pytest.raises(runio.RunFolderError, match="not a folder"):
        runio.RunWriter(blocker, CONFIG)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores folder permissions"
)
def test_read_only_folder_keeps_rows(tmp_path, steps):
    path = tmp_path / "run"
    with runio.RunWriter(path, CONFIG) as w:
        w.write_layers(steps[0][0])
        os.chmod(path, 0o500)
        try:
            with pytest.raises(OSError, match="summary.json"):
                w.write_summary({"a": 1})
        finally:
            os.chmod(path, 0o700)
    assert len(runio.load_run(path).layers) == 2


# ----------------------------------------------------------------------------------------------
# analysis: SDE bands, pathwise check, forces
# ----------------------------------------------------------------------------------------------


def test_simulate_run(tmp_path, steps):
    path = write_run(tmp_path / "run", steps)
    run = runio.load_run(path)
    sim = analysis.simulate_run(run, n_paths=512, seed=3)
    assert sim["n_paths"] == 512 and sim["seed"] == 3 and sim["quantiles"] == [0.05, 0.95]
    assert list(sim["layers"]) == ["fc1", "fc2"]
    n = len(steps)
    for name, s in sim["layers"].items():
        rows = [r for rows, _ in steps for r in rows if r["layer"] == name]
        assert s["steps"].tolist() == list(range(n + 1))
        assert s["observed"].tolist() == [r["sigma"] for r in rows] + [rows[-1]["sigma_next"]]
        for key in ("mean", "std", "lo", "hi"):
            assert s[key].shape == (n + 1,)
        assert s["mean"][0] == s["observed"][0]
        assert (s["lo"] <= s["mean"] + 1e-12).all() and (s["mean"] <= s["hi"] + 1e-12).all()
        assert 0.0 <= s["coverage"] <= 1.0 and s["n_points"] == n
        assert s["n_fallback"] >= 1 and s["n_segments"] == 1 and s["consecutive"]
        pw = sim["pathwise"]["layers"][name]
        assert pw["n_steps"] == n and pw["n_valid"] == n - 2
        assert pw["sigma_start"] == rows[0]["sigma"] and pw["sigma_end"] == rows[-1]["sigma_next"]
        assert math.isclose(pw["sum_delta_obs"], pw["observed_change"], abs_tol=1e-12)
        assert abs(pw["residual"]) < 1e-3 * sum(abs(r["delta_obs"]) for r in rows)
        assert pw["rel_residual"] >= 0
        assert math.isclose(pw["share_drift"] + pw["share_ito"] + pw["share_noise"], 1.0)
        assert pw["noise_scale"] == math.sqrt(pw["sum_diffusion_var"]) > 0
        assert pw["degenerate_fraction"] == 2 / n and pw["nonfinite_fraction"] == 0
    net = sim["network"]
    assert net["steps"].tolist() == list(range(n + 1)) and 0.0 <= net["coverage"] <= 1.0
    assert sim["pathwise"]["network"]["n_steps"] == n
    again = analysis.simulate_run(path, n_paths=512, seed=3)
    assert (again["layers"]["fc1"]["hi"] == sim["layers"]["fc1"]["hi"]).all()
    with pytest.raises(ValueError, match="quantiles"):
        analysis.simulate_run(run, quantiles=(0.9, 0.1))
    with pytest.raises(ValueError, match="n_paths"):
        analysis.simulate_run(run, n_paths=0)


def test_simulate_run_tolerates_bad_coefficients(tmp_path):
    steps = fake_training(n_steps=20, layers=("fc1",), degenerate_at=())
    rows = {r["step"]: r for rs, _ in steps for r in rs}
    rows[5]["drift"] = math.inf  # advances by the observed increment instead
    rows[8]["diffusion_var"] = -1e-9  # rounding below zero: clamped
    rows[12].update(drift=math.nan, sigma_next=math.nan, delta_obs=math.nan, nonfinite=True)
    path = write_run(tmp_path / "run", steps)
    sim = analysis.simulate_run(path, n_paths=64)
    s = sim["layers"]["fc1"]
    assert s["n_skipped"] == 1 and s["n_segments"] == 2 and s["n_fallback"] == 1
    assert 12 in s["steps"].tolist() and 13 in s["steps"].tolist()  # end of block 1, start of 2
    assert 0.0 <= s["coverage"] <= 1.0
    assert sim["pathwise"]["layers"]["fc1"]["nonfinite_fraction"] == 1 / 20
    assert report.make_report(path).exists()


def test_simulate_run_with_sparse_tracking(tmp_path):
    every = 3
    steps = [s for s in fake_training(n_steps=20, degenerate_at=()) if s[1]["step"] % every == 0]
    path = write_run(tmp_path / "run", steps)
    sim = analysis.write_simulation(path, n_paths=128)
    s = sim["layers"]["fc1"]
    tracked = [n["step"] for _, n in steps]
    assert s["n_segments"] == len(tracked) and not s["consecutive"]
    assert s["steps"].tolist() == [p for t in tracked for p in (t, t + 1)]
    assert s["anchor"].tolist() == [True, False] * len(tracked)
    assert s["n_points"] == len(tracked) and 0.0 <= s["coverage"] <= 1.0
    pw = sim["pathwise"]["layers"]["fc1"]
    assert not pw["consecutive"] and pw["n_steps"] == len(tracked)
    text = (path / "sde_layers.csv").read_text().splitlines()
    assert text[0] == "step,layer,observed,mean,lo,hi" and len(text) == 1 + 2 * 2 * len(tracked)


def test_write_simulation_files_and_summary(tmp_path, steps):
    path = write_run(tmp_path / "run", steps)
    sim = analysis.write_simulation(path, n_paths=256, seed=5, quantiles=(0.1, 0.9))
    summary = runio.read_summary(path)
    assert summary["final_loss"] == steps[-1][1]["loss"]  # the loop's keys are kept
    sde = summary["sde"]
    assert sde["n_paths"] == 256 and sde["seed"] == 5 and sde["quantiles"] == [0.1, 0.9]
    for name in ("fc1", "fc2"):
        assert sde["layers"][name]["coverage"] == sim["layers"][name]["coverage"]
        assert 0.0 <= sde["layers"][name]["coverage"] <= 1.0
        assert summary["pathwise"]["layers"][name]["n_valid"] == len(steps) - 2
    assert 0.0 <= sde["network"]["coverage"] <= 1.0
    assert "residual" in summary["pathwise"]["layers"]["fc1"]
    loaded = analysis.load_simulation(path)
    for name in ("fc1", "fc2"):
        for key in ("steps", "observed", "mean", "lo", "hi"):
            assert loaded["layers"][name][key].tolist() == sim["layers"][name][key].tolist()
    assert loaded["network"]["hi"].tolist() == sim["network"]["hi"].tolist()
    net_lines = (path / "sde_network.csv").read_text().splitlines()
    assert net_lines[0] == "step,observed,mean,lo,hi" and len(net_lines) == len(steps) + 2


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def test_make_report_figures_and_html(reported_run):
    path, out = reported_run
    assert out == path / "report.html"
    for name in report.FIGURES:
        png = (path / "figures" / name).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert text.count('src="data:image/png;base64,') == len(report.FIGURES)
    assert "<script" not in text and "onerror=" not in text.replace("onerror=&quot;", "")
    assert HOSTILE not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt;" in text
    assert "a &amp; b" in text and "cost$5$" in text
    for heading in ("Per layer", "Network", "Figures", "Configuration"):
        assert f"<h2>{heading}</h2>" in text


def test_make_report_simulates_when_needed(tmp_path, steps):
    path = write_run(tmp_path / "run", steps[:8])
    out = report.make_report(path, n_paths=64)
    assert (path / "sde_layers.csv").exists() and (path / "sde_network.csv").exists()
    assert runio.read_summary(path)["sde"]["n_paths"] == 64
    assert out.exists()
    with runio.RunWriter(tmp_path / "empty", CONFIG):
        pass
    with pytest.raises(runio.RunFolderError, match="no layer records"):
        report.make_report(tmp_path / "empty")


def test_summary_table(reported_run, tmp_path, steps):
    path, _ = reported_run
    run = runio.load_run(path)
    table = report.summary_table(run)
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["layer", "sigma"]
    pw = run.summary["pathwise"]["layers"]["fc1"]
    cov = run.summary["sde"]["layers"]["fc1"]["coverage"]
    fc1 = next(line for line in lines if line.startswith("fc1 "))
    assert f"{pw['sigma_start']:.4g} -> {pw['sigma_end']:.4g}" in fc1
    assert f"{100 * cov:.1f}%" in fc1 and f"{100 * pw['share_noise']:.1f}%" in fc1
    assert f"{100 * pw['rel_residual_explained']:.2f}%" in fc1
    assert any(line.startswith(HOSTILE) for line in lines)
    assert any(line.startswith("(network log bound)") for line in lines)
    # before `lipfast simulate` there is no coverage yet
    fresh = runio.load_run(write_run(tmp_path / "fresh", steps[:5]))
    fc1_line = lambda text: next(ln for ln in text.splitlines() if ln.startswith("fc1 "))  # noqa: E731
    assert fc1_line(report.summary_table(fresh)).split()[-2:] == ["n/a", "n/a"]  # coverage, fallback steps
    analysis.write_simulation(fresh.path, n_paths=64)  # the Run object predates it
    coverage, fallback = fc1_line(report.summary_table(fresh)).split()[-2:]
    assert coverage.endswith("%") and fallback.isdigit()


def test_missing_matplotlib_is_a_clear_error(tmp_path, steps, monkeypatch):
    path = write_run(tmp_path / "run", steps[:3])
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        report.make_report(path)
    assert not (path / "report.html").exists()


def test_unexplained_steps_fall_back_and_are_counted(tmp_path):
    """Layer steps flagged crossing/closure keep their (finite) forces in the records, but the layer's band
    advances by the observed increment there, the network's log bound takes that layer's observed log
    increment in place of its log-space forces, and the pathwise residual is split with its counts."""
    steps = fake_training(n_steps=12, degenerate_at=())
    crossing = {(3, "fc1"), (7, "fc1"), (7, "fc2")}
    for rows, _ in steps:
        for r in rows:
            if (r["step"], r["layer"]) in crossing:
                r["delta_pred"] = r["first_order"] = r["delta_obs"] + 0.5   # the expansion missed badly
                r["second_order"] = 0.0
                r["flag_names"], r["degenerate"] = "crossing;closure", True
    run = runio.load_run(write_run(tmp_path / "run", steps))
    sim = analysis.simulate_run(run, n_paths=64, seed=0)
    assert sim["layers"]["fc1"]["n_fallback"] == 2 and sim["layers"]["fc2"]["n_fallback"] == 1
    assert sim["layers"]["fc1"]["n_unexplained"] == 2 and sim["network"]["n_unexplained"] == 2
    assert sim["network"]["n_fallback"] == 0  # the network keeps the other layer's forces at those steps
    # The network's coefficients at step 3: fc1's log-space forces replaced by its observed log increment.
    net_rows = sorted(run.network, key=lambda r: r["step"])
    drift, ito, var, n = analysis._network_coefficients(net_rows, run.layers)
    r1, r2 = (next(r for r in run.layers if r["step"] == 3 and r["layer"] == name) for name in ("fc1", "fc2"))
    assert n == 2
    assert drift[3] == pytest.approx(math.log(r1["sigma_next"] / r1["sigma"]) + r2["drift"] / r2["sigma"], rel=1e-12)
    assert ito[3] == pytest.approx(r2["ito"] / r2["sigma"] - 0.5 * r2["diffusion_var"] / r2["sigma"] ** 2, rel=1e-9)
    assert var[3] == pytest.approx(r2["diffusion_var"] / r2["sigma"] ** 2, rel=1e-9)
    pw = sim["pathwise"]["layers"]["fc1"]
    assert pw["n_unexplained"] == 2 and pw["n_valid"] == 12
    assert pw["residual_unexplained"] == pytest.approx(-1.0, rel=1e-12)
    assert pw["residual"] == pytest.approx(pw["residual_explained"] + pw["residual_unexplained"], rel=1e-12)
    moved = sum(abs(r["delta_obs"]) for r in run.layers if r["layer"] == "fc1")
    # Each flagged step's miss counts at most its own movement.
    flagged = [r for r in run.layers if r["layer"] == "fc1" and (r["step"], "fc1") in crossing]
    assert pw["unexplained_share"] == pytest.approx(sum(min(0.5, abs(r["delta_obs"])) for r in flagged) / moved,
                                                    rel=1e-12)
    explained = sum(r["delta_obs"] - r["delta_pred"] for r in run.layers if r["layer"] == "fc1" and r not in flagged)
    assert pw["rel_residual_explained"] == pytest.approx(abs(explained) / moved, rel=1e-9)
    table = report.summary_table(run, sim)
    assert any(line.startswith("warning: layer 'fc1':") and "not explained by the forces" in line
               for line in table.splitlines())


def test_a_step_cut_short_is_not_loaded(tmp_path, steps):
    """A SIGKILL can land inside the write of a step's layer lines (the kernel stops a write between pages):
    the layer rows of a step with no network row are left out and counted, whole steps are kept."""
    path = write_run(tmp_path / "run", steps[:3])
    with runio.RunWriter(path, CONFIG, resume=True, resume_from_step=3) as w:
        w.write_layers(steps[3][0][:1])  # one of its two layer rows, and no network row
    run = runio.load_run(path)
    assert [r["step"] for r in run.layers] == [0, 0, 1, 1, 2, 2] and len(run.network) == 3
    assert run.dropped_lines == 1


def test_a_run_written_before_the_sigma_err_column_still_loads(tmp_path, steps):
    """layers.csv of an older lipfast (no sigma_err column) loads with NaN there; resuming it is refused."""
    path = write_run(tmp_path / "old", steps[:3])
    lines = (path / runio.LAYERS_FILE).read_text().splitlines()
    header = lines[0].split(",")
    at = header.index("sigma_err")
    old = [",".join(c for i, c in enumerate(line.split(",")) if i != at) for line in lines]
    (path / runio.LAYERS_FILE).write_text("\n".join(old) + "\n")
    run = runio.load_run(path)
    assert len(run.layers) == 3 * 2 and all(math.isnan(r["sigma_err"]) for r in run.layers)
    assert [r["sigma"] for r in run.layers] == [r["sigma"] for rows, _ in steps[:3] for r in rows]
    with pytest.raises(runio.RunFolderError, match="header"):
        write_run(path, steps[3:4], resume=True, resume_from_step=3)


def test_a_run_written_before_the_group_and_shared_with_columns_still_loads(tmp_path, steps):
    """layers.csv of an older lipfast (sigma_err, but no group/shared_with) loads with their neutral values."""
    path = write_run(tmp_path / "old", steps[:3])
    lines = (path / runio.LAYERS_FILE).read_text().splitlines()
    keep = len(lines[0].split(",")) - 2
    (path / runio.LAYERS_FILE).write_text("\n".join(",".join(line.split(",")[:keep]) for line in lines) + "\n")
    run = runio.load_run(path)
    assert len(run.layers) == 3 * 2
    assert all(r["group"] == -1 and r["shared_with"] == "" and math.isfinite(r["sigma_err"]) for r in run.layers)
