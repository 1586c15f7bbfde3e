"""``lipfast sweep``: the grid of run folders, the table and figures against those runs, error paths."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from lipfast import analysis, runio, sweep
from lipfast.cli import main
from lipfast.train import TrainConfig

# digits, 200 samples -> 160 train; 4 steps keep each run well under a second.
TINY = ["--n-samples", "200", "--widths", "16", "16", "--rank", "4", "--steps", "4", "--checkpoint-every", "4",
        "--sde-paths", "128", "--no-report"]  # fmt: skip


def usage_error(capsys, argv: list[str], match: str) -> str:
    """``main(argv)`` exits 2 with exactly one line on stderr matching ``match``, and no traceback."""
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, f"exit {rc} for {argv}; stderr: {err!r}"
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), f"expected one line on stderr, got {err!r}"
    assert re.search(match, lines[0]), f"{lines[0]!r} does not match {match!r}"
    return lines[0]


def read_csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def label_noise_sweep(tmp_path_factory) -> tuple[Path, str]:
    """2 values x 2 seeds of label noise, trained with two processes."""
    out = tmp_path_factory.mktemp("sweep") / "ln"
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["sweep", "--factor", "label_noise", "--values", "0", "0.4", "--seeds", "2", "--jobs", "2",
                   "--out", str(out), *TINY])
    assert rc == 0, buf.getvalue()
    return out, buf.getvalue()


def test_sweep_writes_one_run_folder_per_value_and_seed(label_noise_sweep):
    out, stdout = label_noise_sweep
    spec = json.loads((out / "sweep.json").read_text(encoding="utf-8"))
    assert spec["factor"] == "label_noise" and spec["values"] == [0.0, 0.4] and spec["seeds"] == 2
    assert spec["finished"] is True and spec["jobs"] == 2
    expected = {f"label_noise={v}/seed={s}" for v in ("0", "0.4") for s in (0, 1)}
    assert {r["path"] for r in spec["runs"]} == expected
    for r in spec["runs"]:
        run = runio.load_run(out / r["path"])
        assert run.summary["finished"] is True and "sde" in run.summary
        # the factor is set, replicate r shifts every seed, and nothing else changes
        assert run.config["label_noise"] == r["value"]
        assert run.config["seed"] == run.config["data_seed"] == run.config["noise_seed"] == r["replicate"]
        assert run.config["steps"] == 4 and run.config["widths"] == [16, 16] and run.config["sde_paths"] == 128
        assert [row["step"] for row in run.network] == [0, 1, 2, 3]
    # replicates differ, and paired seeds share the initialisation across values
    a = runio.load_run(out / "label_noise=0/seed=0").network[0]["log_bound"]
    b = runio.load_run(out / "label_noise=0/seed=1").network[0]["log_bound"]
    c = runio.load_run(out / "label_noise=0.4/seed=0").network[0]["log_bound"]
    assert a != b and a == c
    assert "| label_noise | n | final_log_bound" in stdout and "table: " in stdout
    assert sum("lipfast sweep: [" in ln for ln in stdout.splitlines()) == 4


def test_sweep_table_matches_the_run_folders(label_noise_sweep):
    out, _ = label_noise_sweep
    rows = read_csv(out / "sweep_table.csv")
    assert list(rows[0]) == ["label_noise", "quantity", "layer", "n", "mean", "std", "min", "max"]
    table = {(float(r["label_noise"]), r["quantity"], r["layer"]): r for r in rows}
    for value in (0.0, 0.4):
        runs = [runio.load_run(out / f"label_noise={value:g}/seed={s}") for s in (0, 1)]
        # network: final and peak log bound, cumulative forces, coverage
        final = [r.network[-1]["log_bound_next"] for r in runs]
        peak = [max(max(x["log_bound"], x["log_bound_next"]) for x in r.network) for r in runs]
        cov = [r.summary["sde"]["network"]["coverage"] for r in runs]
        for q, xs in (("final_log_bound", final), ("peak_log_bound", peak), ("coverage", cov)):
            row = table[(value, q, "network")]
            assert int(row["n"]) == 2
            assert float(row["mean"]) == pytest.approx(np.mean(xs), rel=1e-12, abs=1e-15), q
            assert float(row["std"]) == pytest.approx(np.std(xs, ddof=1), rel=1e-9, abs=1e-15), q
        net_ito = [sum(x["ito"] for x in r.network if math.isfinite(x["ito"])) for r in runs]
        assert float(table[(value, "cum_ito", "network")]["mean"]) == pytest.approx(np.mean(net_ito), rel=1e-9)
        # layers: cumulative drift / diffusion / Itô, pathwise residual and coverage per layer
        for name in runs[0].layer_names:
            recs = [[x for x in r.layers if x["layer"] == name] for r in runs]
            fsum = lambda rs, k: sum(x[k] for x in rs if math.isfinite(x[k]))  # noqa: E731
            for q, k in (("cum_drift", "drift"), ("cum_ito", "ito"), ("sum_diffusion_var", "diffusion_var")):
                want = np.mean([fsum(rs, k) for rs in recs])
                assert float(table[(value, q, name)]["mean"]) == pytest.approx(want, rel=1e-9, abs=1e-18), (q, name)
            pw = [analysis.pathwise_layer(rs)["rel_residual"] for rs in recs]
            assert float(table[(value, "pathwise_rel_residual", name)]["mean"]) == pytest.approx(np.mean(pw))
            cov = [r.summary["sde"]["layers"][name]["coverage"] for r in runs]
            assert float(table[(value, "coverage", name)]["mean"]) == pytest.approx(np.mean(cov))
            sig = [rs[-1]["sigma_next"] for rs in recs]
            assert float(table[(value, "sigma_final", name)]["mean"]) == pytest.approx(np.mean(sig), rel=1e-12)
    # sweep_runs.csv holds each run's own numbers
    per_run = read_csv(out / "sweep_runs.csv")
    one = [r for r in per_run if r["run"] == "label_noise=0.4/seed=1" and r["quantity"] == "final_log_bound"]
    assert len(one) == 1
    assert float(one[0]["result"]) == runio.load_run(out / "label_noise=0.4/seed=1").network[-1]["log_bound_next"]


def test_sweep_markdown_and_figures(label_noise_sweep):
    out, _ = label_noise_sweep
    md = (out / "sweep_table.md").read_text(encoding="utf-8")
    assert md.startswith("# lipfast sweep: label_noise")
    table = read_csv(out / "sweep_table.csv")
    mean = float(next(r["mean"] for r in table if r["label_noise"] == "0.4" and r["quantity"] == "final_log_bound"))
    assert f"{mean:.4g} ± " in md
    for name in runio.load_run(out / "label_noise=0/seed=0").layer_names:
        assert f"| 0.4 | `{name}` |" in md
    for fname in sweep.FIGURES:
        data = (out / "figures" / fname).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", fname
    assert not (out / "figures" / "spread.png").exists()


def test_sweep_rerun_reuses_finished_runs_and_refuses_other_options(label_noise_sweep, tmp_path, capsys):
    out, _ = label_noise_sweep
    before = (out / "label_noise=0/seed=0/layers.csv").stat().st_mtime_ns
    assert main(["sweep", "--factor", "label_noise", "--values", "0", "0.4", "--seeds", "2", "--out", str(out),
                 *TINY]) == 0
    stdout, _ = capsys.readouterr()
    assert "reusing 4 finished run(s)" in stdout
    assert (out / "label_noise=0/seed=0/layers.csv").stat().st_mtime_ns == before
    usage_error(capsys, ["sweep", "--factor", "label_noise", "--values", "0", "--out", str(out), *TINY,
                         "--lr", "0.2"], r"^lipfast sweep: error: .*other options.*--overwrite")


def test_sweep_data_seed_fixes_the_initialisation_and_compares_with_the_sde_band(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["sweep", "--factor", "data_seed", "--seeds", "3", "--out", str(out), "--quiet", *TINY]) == 0
    capsys.readouterr()
    spec = json.loads((out / "sweep.json").read_text(encoding="utf-8"))
    assert spec["values"] == [0, 1, 2] and [r["path"] for r in spec["runs"]] == [
        "data_seed=0/seed=0", "data_seed=1/seed=0", "data_seed=2/seed=0"]
    runs = [runio.load_run(out / r["path"]) for r in spec["runs"]]
    assert {r.config["seed"] for r in runs} == {0} and [r.config["data_seed"] for r in runs] == [0, 1, 2]
    # same initialisation: identical σ before the first step, different trajectories after
    assert runs[0].layers[0]["sigma"] == runs[1].layers[0]["sigma"] == runs[2].layers[0]["sigma"]
    assert runs[0].network[-1]["log_bound_next"] != runs[1].network[-1]["log_bound_next"]
    rows = read_csv(out / "sweep_table.csv")
    all_row = next(r for r in rows if r["data_seed"] == "all" and r["quantity"] == "final_log_bound")
    finals = [r.network[-1]["log_bound_next"] for r in runs]
    assert int(all_row["n"]) == 3 and float(all_row["std"]) == pytest.approx(np.std(finals, ddof=1))
    spread = spec["spread"]
    net = spread["series"]["network"]
    assert 0.0 <= net["coverage_others"] <= 1.0 and net["std_sde"] > 0
    assert net["std_observed"] == pytest.approx(np.std(finals, ddof=1), rel=1e-9)
    assert spread["expected_coverage_others"] == pytest.approx(0.7552, abs=1e-3)
    assert (out / "figures" / "spread.png").read_bytes()[:4] == b"\x89PNG"
    assert "Spread across data orders" in (out / "sweep_table.md").read_text(encoding="utf-8")


def test_sweep_over_the_optimizer(tmp_path, capsys):
    """--factor optimizer: one run per optimizer on the same seeds, labelled (not numeric) x positions."""
    out = tmp_path / "opt"
    assert main(["sweep", "--factor", "optimizer", "--values", "sgd", "adamw", "--out", str(out), "--quiet",
                 "--lr", "0.01", *TINY]) == 0
    capsys.readouterr()
    spec = json.loads((out / "sweep.json").read_text(encoding="utf-8"))
    assert spec["values"] == ["sgd", "adamw"]
    runs = [runio.load_run(out / r["path"]) for r in spec["runs"]]
    assert [r.config["optimizer"] for r in runs] == ["sgd", "adamw"]
    assert runs[0].layers[0]["sigma"] == runs[1].layers[0]["sigma"]  # same initialisation
    assert all("sgd_equivalent" not in r["flag_names"] for r in runs[1].layers)
    assert "| adamw |" in (out / "sweep_table.md").read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="optimizer must be names among sgd, adam, adamw, got 'lion'"):
        sweep.parse_values("optimizer", ["sgd", "lion"])


def test_loglog_slope_recovers_an_exponent():
    b = np.array([8, 16, 32, 64])
    fit = sweep.loglog_slope(b, 3.0 / b)
    assert fit["exponent"] == pytest.approx(-1.0) and fit["r2"] == pytest.approx(1.0) and fit["n"] == 4
    assert math.isnan(sweep.loglog_slope([1.0], [1.0])["exponent"])


def test_parse_values_and_plan():
    assert sweep.parse_values("batch_size", ["16", "32"]) == [16, 32]
    assert sweep.parse_values("init_scale", ["0.5", "2"]) == [0.5, 2.0]
    assert sweep.parse_values("data_seed", None, seeds=3, base_data_seed=5) == [5, 6, 7]
    plan = sweep.plan_sweep("init_scale", [0.5, 2.0], TrainConfig(seed=3, data_seed=7), seeds=2)
    assert [(p.rel_path, p.config.seed, p.config.data_seed) for p in plan] == [
        ("init_scale=0.5/seed=3", 3, 7), ("init_scale=0.5/seed=4", 4, 8),
        ("init_scale=2/seed=3", 3, 7), ("init_scale=2/seed=4", 4, 8)]
    for bad_factor, bad in (("label_noise", ["1.0"]), ("batch_size", ["3.5"]), ("batch_size", ["1"]),
                            ("init_scale", ["0"]), ("weight_decay", ["-1"]), ("data_seed", ["-2"]),
                            ("label_noise", ["x"]), ("label_noise", ["0.1", "0.1"]), ("label_noise", ["nan"])):
        with pytest.raises(ValueError, match=bad_factor):
            sweep.parse_values(bad_factor, bad)
    with pytest.raises(ValueError, match="unknown factor"):
        sweep.parse_values("lr", ["0.1"])


@pytest.mark.parametrize("argv, match", [
    (["--factor", "lr", "--values", "0.1"], r"argument --factor: invalid choice: 'lr'"),
    (["--factor", "label_noise", "--values", "0", "1.5"], r"--values for label_noise must be numbers in \[0, 1\), got '1.5'"),
    (["--factor", "batch_size", "--values", "16", "abc"], r"--values for batch_size must be integers"),
    (["--factor", "init_scale", "--values", "-1"], r"--values for init_scale must be numbers > 0"),
    (["--factor", "label_noise", "--values", "0", "--seeds", "0"], r"--seeds must be >= 1, got 0"),
    (["--factor", "label_noise", "--values", "0", "--jobs", "0"], r"--jobs must be >= 1, got 0"),
    (["--factor", "label_noise"], r"--values is required for --factor label_noise"),
    (["--factor", "data_seed", "--values", "0", "1", "--seeds", "2"], r"give --values or --seeds, not both"),
    (["--factor", "label_noise", "--values", "0", "--label-noise", "0.2"], r"--label-noise conflicts with --factor"),
    (["--factor", "batch_size", "--values", "16", "4000"], r"batch_size must be <= the 160 training samples"),
    (["--factor", "label_noise", "--values", "0", "--lr", "-1"], r"lr must be a number > 0"),
])
def test_sweep_usage_errors(tmp_path, capsys, argv, match):
    out = tmp_path / "bad"
    usage_error(capsys, ["sweep", *argv, "--out", str(out), *TINY], r"^lipfast sweep: error: .*" + match)
    assert not (out / "sweep.json").exists()


def test_sweep_missing_out_is_a_usage_error(capsys):
    usage_error(capsys, ["sweep", "--factor", "label_noise", "--values", "0"], r"--out")


def test_sweep_refuses_a_folder_holding_other_files(tmp_path, capsys):
    run = tmp_path / "s" / "label_noise=0" / "seed=0"
    run.mkdir(parents=True)
    (run / "notes.txt").write_text("mine", encoding="utf-8")
    usage_error(capsys, ["sweep", "--factor", "label_noise", "--values", "0", "--out", str(tmp_path / "s"), *TINY],
                r"not a lipfast run folder")
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_experiments_script_quick(tmp_path):
    """scripts/experiments.py end to end at toy sizes (a smoke test of the script, a few minutes)."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "experiments.py"
    doc, figures = tmp_path / "EXPERIMENTS.md", tmp_path / "figures"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path / "runs"), "--doc", str(doc),
                           "--figures", str(figures)], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = doc.read_text(encoding="utf-8")
    for heading in ("## 1. Pathwise", "### 1b. Flagged steps", "## 2. Batch size", "## 3. Label noise",
                    "## 4. Initialisation scale", "## 5. Sampling trajectories", "## 6. Weight decay",
                    "## 7. Ensembles over sampling", "## 8. BatchNorm + Mixup", "## 9. Growth past convergence",
                    "## 10. SGD against AdamW"):
        assert heading in text, heading
    pngs = sorted(figures.glob("*.png"))
    assert len(pngs) == 11 and all(p.stat().st_size <= 80 * 1024 for p in pngs)
    assert all(f"figures/{p.name}" in text for p in pngs)
