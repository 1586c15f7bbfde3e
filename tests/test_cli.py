"""The ``lipfast`` command line (API.md "Command line"): demo end to end, train on tiny configs,
report and simulate on a finished run, every usage error (status 2, one line on stderr, no
traceback), ``python -m lipfast``, and the README's command lines that CI runs."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lipfast.data
from lipfast import runio
from lipfast.cli import main
from lipfast.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]

# digits, 200 samples -> 160 train / 40 test; batch 32 -> 5 steps per epoch.
TINY = ["--n-samples", "200", "--widths", "16", "16", "--rank", "4", "--steps", "4", "--checkpoint-every", "2",
        "--eval-every", "100", "--sde-paths", "256", "--quiet"]  # fmt: skip
RUN_FILES = ("config.json", "layers.csv", "network.csv", "summary.json", "report.html")


def usage_error(capsys, argv: list[str], match: str) -> str:
    """Run ``main(argv)``; assert exit status 2 and exactly one line on stderr matching ``match``."""
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, f"exit {rc} for {argv}; stderr: {err!r}"
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), f"expected one line on stderr, got {err!r}"
    assert lines[0].strip() and re.search(match, lines[0]), f"{lines[0]!r} does not match {match!r}"
    return lines[0]


def assert_same_records(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for k in ra:
            if isinstance(ra[k], float) and math.isnan(ra[k]) and math.isnan(rb[k]):
                continue
            assert ra[k] == rb[k], (ra.get("step"), ra.get("layer"), k)


def assert_summary_table(stdout: str, run: runio.Run) -> None:
    """The per-layer summary table: header, one line per tracked layer, the network line."""
    lines = stdout.splitlines()
    head = [i for i, ln in enumerate(lines) if ln.startswith("layer") and "sigma start -> end" in ln]
    assert head, stdout
    body = lines[head[0] + 2:]
    names = [ln.split()[0] for ln in body[: len(run.layer_names)]]
    assert names == run.layer_names, stdout
    assert any(ln.startswith("(network log bound)") for ln in body), stdout
    for col in ("drift", "ito", "noise", "coverage"):
        assert col in lines[head[0]]


def assert_report_line(stdout: str, run_dir: Path) -> None:
    expected = f"report: {(run_dir / 'report.html').resolve()}"
    assert expected in stdout.splitlines(), stdout


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished tiny run (records and summary, no simulation or report yet)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    cfg = TrainConfig(n_samples=200, widths=(16, 16), rank=4, steps=5, checkpoint_every=5, sde_paths=256)
    return train(cfg, out, quiet=True, report=False)


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


# ----------------------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------------------


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "40", "--quiet"]) == 0
    stdout, _ = capsys.readouterr()
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figures, "no figures"
    for png in figures:
        assert (out / "figures" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = runio.load_run(out)
    assert run.config["steps"] == 40 and run.config["model"] == "mlp" and run.config["dataset"] == "digits"
    assert [r["step"] for r in run.network] == list(range(40))
    assert len(run.layers) == 40 * len(run.layer_names) and len(run.layer_names) >= 2
    assert run.summary["finished"] is True and "sde" in run.summary
    assert_summary_table(stdout, run)
    assert_report_line(stdout, out)
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<html" in html.lower()

    # a second demo into the same (run) folder replaces it
    assert main(["demo", "--out", str(out), "--steps", "5", "--quiet"]) == 0
    capsys.readouterr()
    assert runio.load_run(out).summary["steps"] == 5


def test_demo_refuses_a_folder_holding_other_files(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious", encoding="utf-8")
    usage_error(capsys, ["demo", "--out", str(out), "--steps", "5", "--quiet"], "not a lipfast run folder")
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    assert main(["demo", "--out", str(out), "--steps", "3", "--quiet", "--overwrite"]) == 0
    capsys.readouterr()
    assert (out / "thesis.tex").read_text(encoding="utf-8") == "precious"
    assert (out / "report.html").is_file()


# ----------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, widths", [("mlp", ["16", "16"]), ("cnn", ["4", "4"]), ("resnet", ["4"])])
def test_train_each_model(tmp_path, capsys, model, widths):
    out = tmp_path / model
    argv = ["train", "--out", str(out), *TINY, "--model", model, "--widths", *widths, "--no-report"]
    assert main(argv) == 0
    stdout, _ = capsys.readouterr()
    assert f"run: {out.resolve()}" in stdout.splitlines()
    run = runio.load_run(out)
    assert run.config["model"] == model and run.config["widths"] == [int(w) for w in widths]
    assert run.summary["finished"] is True and run.summary["steps"] == 4
    assert len(run.layers) == 4 * len(run.layer_names)
    if model != "mlp":
        assert "conv2d" in {r["kind"] for r in run.layers}
    assert not (out / "report.html").exists()


def test_train_sgd_options_and_report(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), *TINY, "--momentum", "0.9", "--nesterov", "--weight-decay", "5e-4",
            "--label-noise", "0.2", "--noise-seed", "7", "--lr", "0.02", "--batch-size", "16"]
    assert main(argv) == 0
    stdout, _ = capsys.readouterr()
    run = runio.load_run(out)
    c = run.config
    assert (c["momentum"], c["nesterov"], c["weight_decay"], c["label_noise"], c["noise_seed"], c["lr"],
            c["batch_size"]) == (0.9, True, 5e-4, 0.2, 7, 0.02, 16)
    assert {r["lr"] for r in run.layers} == {0.02} and {r["batch"] for r in run.layers} == {16}
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    assert list((out / "figures").glob("*.png"))
    assert run.summary["sde"]["n_paths"] == 256
    assert_summary_table(stdout, run)
    assert_report_line(stdout, out)


def test_train_config_file_and_command_line_override(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text('# a tiny run\nn_samples = 200\nwidths = [8, 8]\nsteps = 3\nlr = 0.1\nrank = 2\n'
                   'momentum = 0.5\ncheckpoint_every = 3\n', encoding="utf-8")  # fmt: skip
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--lr", "0.2", "--quiet", "--no-report"]) == 0
    capsys.readouterr()
    c = runio.load_run(out).config
    assert (c["widths"], c["steps"], c["lr"], c["rank"], c["momentum"]) == ([8, 8], 3, 0.2, 2, 0.5)
    # everything else keeps its default
    assert c == {**TrainConfig().to_dict(), "n_samples": 200, "widths": [8, 8], "steps": 3, "lr": 0.2,
                 "rank": 2, "momentum": 0.5, "checkpoint_every": 3}


def test_train_epochs_instead_of_steps(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--n-samples", "200", "--widths", "8", "--epochs", "2", "--quiet", "--no-report"]
    assert main(argv) == 0
    capsys.readouterr()
    run = runio.load_run(out)
    assert run.config["epochs"] == 2 and run.config["steps"] is None
    assert run.summary["steps"] == 10  # 160 train samples // 32 per batch = 5 steps per epoch


def test_train_existing_run_needs_overwrite_or_resume(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), *TINY, "--no-report"]
    assert main(argv) == 0
    capsys.readouterr()
    line = usage_error(capsys, argv, "^lipfast train: error: .*already holds a lipfast run.*--overwrite.*--resume")
    assert "=True" not in line, "the command line speaks in flags, not the API's keyword arguments"
    assert main(argv + ["--overwrite", "--steps", "2"]) == 0
    capsys.readouterr()
    assert runio.load_run(out).summary["steps"] == 2


def test_train_into_a_non_run_folder_needs_overwrite_and_keeps_other_files(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me", encoding="utf-8")
    argv = ["train", "--out", str(out), *TINY, "--no-report"]
    usage_error(capsys, argv, "refusing to write into .*not a lipfast run folder")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    usage_error(capsys, argv + ["--resume"], "cannot resume")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main(argv + ["--overwrite"]) == 0
    capsys.readouterr()
    assert (out / "notes.txt").read_text(encoding="utf-8") == "keep me"
    assert runio.load_run(out).summary["finished"] is True


def test_ctrl_c_then_resume_equals_an_uninterrupted_run(tmp_path, capsys, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) after step 5 with checkpoints every 2 steps: status 130, one line
    on stderr; ``--resume`` then drops step 4's records and gives the uninterrupted run's records."""
    common = [*TINY, "--steps", "8", "--momentum", "0.9", "--no-report"]
    ref = tmp_path / "straight"
    assert main(["train", "--out", str(ref), *common]) == 0
    capsys.readouterr()

    real_batches = lipfast.data.batches
    calls = []

    def interrupted_batches(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return real_batches(*args, **kwargs)

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(lipfast.data, "batches", interrupted_batches)
        rc = main(["train", "--out", str(out), *common])
    _, err = capsys.readouterr()
    assert rc == 130
    assert len(err.splitlines()) == 1 and "--resume" in err and "Traceback" not in err
    part = runio.load_run(out)
    assert [r["step"] for r in part.network] == [0, 1, 2, 3, 4]
    assert int(torch.load(out / "checkpoint.pt", weights_only=True)["step"]) == 4

    # the run's options other than those given are taken from the run folder
    usage_error(capsys, ["train", "--out", str(out), "--resume", "--quiet", "--lr", "0.5"],
                r"cannot resume .* other options .*lr 0\.05 -> 0\.5")
    assert main(["train", "--out", str(out), "--resume", "--quiet", "--no-report"]) == 0
    capsys.readouterr()
    got, want = runio.load_run(out), runio.load_run(ref)
    assert_same_records(got.layers, want.layers)
    assert_same_records(got.network, want.network)
    assert got.summary["finished"] is True
    assert got.config == want.config


def test_ctrl_c_wrapped_by_a_class_creation_is_still_an_interrupt(tmp_path, capsys, monkeypatch):
    """Ctrl-C while Python creates a class (torch's lazy import of torch._dynamo when the optimizer is made)
    arrives as "RuntimeError: Error calling __set_name__ ..." caused by the KeyboardInterrupt: the same one line
    and status 130 as a plain Ctrl-C, not a traceback (found by the random fault loop)."""
    def interrupted_optimizer(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise RuntimeError("Error calling __set_name__ on 'cached_property' instance") from exc

    monkeypatch.setattr(lipfast.train, "make_optimizer", interrupted_optimizer)
    rc = main(["train", "--out", str(tmp_path / "run"), *TINY, "--no-report"])
    _, err = capsys.readouterr()
    assert rc == 130 and len(err.splitlines()) == 1 and "--resume" in err and "Traceback" not in err
    with pytest.raises(RuntimeError, match="not an interrupt"):  # any other error still propagates
        monkeypatch.setattr(lipfast.train, "make_optimizer", lambda *a, **k: (_ for _ in ()).throw(
            RuntimeError("not an interrupt")))
        main(["train", "--out", str(tmp_path / "run2"), *TINY, "--no-report"])


def test_resume_can_extend_a_finished_run(tmp_path, capsys):
    ref, out = tmp_path / "straight", tmp_path / "run"
    assert main(["train", "--out", str(ref), *TINY, "--steps", "7", "--no-report"]) == 0
    assert main(["train", "--out", str(out), *TINY, "--steps", "4", "--no-report"]) == 0
    assert main(["train", "--out", str(out), "--resume", "--steps", "7", "--quiet", "--no-report"]) == 0
    capsys.readouterr()
    got, want = runio.load_run(out), runio.load_run(ref)
    assert_same_records(got.layers, want.layers)
    assert_same_records(got.network, want.network)
    assert got.summary["steps"] == 7


# ----------------------------------------------------------------------------------------------
# Usage errors of train: status 2, one line, and no run folder left behind
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, match", [
    (["--dataset", "imagenet"], r"dataset must be one of .*digits.*got 'imagenet'"),
    (["--model", "transformer"], r"model must be one of .*mlp.*got 'transformer'"),
    (["--bogus"], r"^lipfast train: error: unrecognized arguments: --bogus"),
    (["--stpes", "3"], r"^lipfast train: error: unrecognized arguments: --stpes 3; did you mean --steps"),
    (["--lr", "-0.1"], r"lr must be a number > 0"),
    (["--lr", "0"], r"lr must be a number > 0"),
    (["--lr", "nan"], r"lr must be a number > 0"),
    (["--lr", "fast"], r"--lr: invalid float value"),
    (["--batch-size", "0"], r"batch_size must be an int >= 1"),
    (["--batch-size", "500"], r"batch_size must be <= the 160 training samples"),
    (["--label-noise", "1"], r"label_noise must be a number in \[0, 1\)"),
    (["--label-noise", "1.5"], r"label_noise"),
    (["--label-noise", "-0.1"], r"label_noise"),
    (["--momentum", "1"], r"momentum"),
    (["--weight-decay", "-1"], r"weight_decay"),
    (["--nesterov"], r"nesterov.*momentum > 0"),
    (["--steps", "0"], r"steps must be an int >= 1"),
    (["--steps", "5", "--epochs", "2"], r"steps and epochs exclude each other"),
    (["--widths", "16", "0"], r"widths"),
    (["--rank", "0"], r"rank"),
    (["--dtype", "float16"], r"dtype"),
    (["--n-samples", "1"], r"n_samples"),
    (["--n-samples", "999999"], r"n_samples must be at most"),
    (["--init-scale", "0"], r"init_scale"),
])  # fmt: skip
def test_train_option_errors(tmp_path, capsys, args, match):
    out = tmp_path / "run"
    base = ["--n-samples", "200", "--widths", "8", "--steps", "2", "--quiet", "--no-report"]
    usage_error(capsys, ["train", "--out", str(out), *base, *args], match)
    assert not out.exists(), "a rejected run left a folder behind"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_cuda_without_cuda(tmp_path, capsys):
    usage_error(capsys, ["train", "--out", str(tmp_path / "run"), "--device", "cuda"], "no CUDA device")


def test_train_overwrite_with_resume(tmp_path, capsys):
    usage_error(capsys, ["train", "--out", str(tmp_path / "run"), "--overwrite", "--resume"],
                "--overwrite and --resume exclude each other")


def test_train_resume_of_nothing(tmp_path, capsys):
    usage_error(capsys, ["train", "--out", str(tmp_path / "none"), *TINY, "--resume"], "cannot resume")


def test_train_out_below_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x", encoding="utf-8")
    line = usage_error(capsys, ["train", "--out", str(tmp_path / "file" / "run"), *TINY],
                       "cannot create run folder")
    assert "[Errno" not in line


def test_train_out_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x", encoding="utf-8")
    usage_error(capsys, ["train", "--out", str(tmp_path / "file"), *TINY], "not a folder")
    assert (tmp_path / "file").read_text(encoding="utf-8") == "x"


@pytest.mark.parametrize("text, match", [
    ("n_samples = 200\nbatch_sise = 16\n", r"unknown option 'batch_sise' \(did you mean 'batch_size'\?\)"),
    ("learning_rat = 0.1\n", r"unknown option 'learning_rat'"),
    ("lr: 0.1\nsteps: 5\n", r"not valid TOML"),
    ("{\"lr\": 0.1}\n", r"not valid TOML"),
    ("[train]\nlr = 0.1\n", r"tables are not supported"),
    ('lr = "fast"\n', r"lr must be a number > 0"),
    ("widths = 16\n", r"widths"),
    ("steps = 2.5\n", r"steps must be an int"),
    ("label_noise = 1.0\n", r"label_noise"),
])  # fmt: skip
def test_train_bad_config_file(tmp_path, capsys, text, match):
    cfg = tmp_path / "run.toml"
    cfg.write_text(text, encoding="utf-8")
    out = tmp_path / "run"
    usage_error(capsys, ["train", "--config", str(cfg), "--out", str(out)], match)
    assert not out.exists()


def test_train_missing_config_file(tmp_path, capsys):
    usage_error(capsys, ["train", "--config", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "run")],
                "does not exist")


@pytest.mark.parametrize("argv, match", [
    ([], r"required: COMMAND"),
    (["fly"], r"invalid choice: 'fly'"),
    (["train"], r"required: --out"),
    (["report"], r"required: run_dir"),
    (["simulate", "x", "--paths", "many"], r"--paths: invalid int value"),
    (["demo", "--steps", "ten"], r"--steps: invalid int value"),
])  # fmt: skip
def test_parser_errors(capsys, argv, match):
    usage_error(capsys, argv, match)


# ----------------------------------------------------------------------------------------------
# report and simulate
# ----------------------------------------------------------------------------------------------


def test_simulate_then_report(run_copy, capsys):
    assert main(["simulate", str(run_copy), "--paths", "256", "--seed", "3"]) == 0
    stdout, _ = capsys.readouterr()
    run = runio.load_run(run_copy)
    for name in run.layer_names:
        assert re.search(rf"^{re.escape(name)}: SDE band coverage \d\.\d\d$", stdout, re.M), stdout
    assert re.search(r"^log_bound: SDE band coverage \d\.\d\d$", stdout, re.M)
    assert (run_copy / "sde_layers.csv").is_file() and (run_copy / "sde_network.csv").is_file()
    sde = json.loads((run_copy / "summary.json").read_text(encoding="utf-8"))["sde"]
    assert sde["n_paths"] == 256 and sde["seed"] == 3 and set(sde["layers"]) == set(run.layer_names)
    assert not (run_copy / "report.html").exists()

    assert main(["report", str(run_copy)]) == 0
    stdout, _ = capsys.readouterr()
    for name in RUN_FILES:
        assert (run_copy / name).is_file(), name
    assert list((run_copy / "figures").glob("*.png"))
    summary = json.loads((run_copy / "summary.json").read_text(encoding="utf-8"))
    assert summary["sde"]["n_paths"] == 256  # the simulation above was reused, not redone
    assert summary["finished"] is True
    assert_summary_table(stdout, runio.load_run(run_copy))
    assert_report_line(stdout, run_copy)


def test_report_simulates_when_needed(run_copy, capsys):
    assert main(["report", str(run_copy)]) == 0
    stdout, _ = capsys.readouterr()
    assert (run_copy / "report.html").is_file() and list((run_copy / "figures").glob("*.png"))
    assert "sde" in json.loads((run_copy / "summary.json").read_text(encoding="utf-8"))
    assert_report_line(stdout, run_copy)


def _header_only(run: Path) -> None:
    (run / "layers.csv").write_text(",".join(runio.LAYER_COLUMNS) + "\n", encoding="utf-8")


def _no_layers(run: Path) -> None:
    (run / "layers.csv").unlink()


def _short_row(run: Path) -> None:
    lines = (run / "layers.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    lines[2] = ",".join(lines[2].split(",")[:5]) + "\n"
    (run / "layers.csv").write_text("".join(lines), encoding="utf-8")


def _bad_header(run: Path) -> None:
    text = (run / "layers.csv").read_text(encoding="utf-8")
    (run / "layers.csv").write_text(text.replace("sigma_next", "sigma_after", 1), encoding="utf-8")


def _config_garbage(run: Path) -> None:
    (run / "config.json").write_text("{this is not json", encoding="utf-8")


def _config_missing(run: Path) -> None:
    (run / "config.json").unlink()


def _config_empty(run: Path) -> None:
    (run / "config.json").write_text("", encoding="utf-8")


def _future_schema(run: Path) -> None:
    meta = json.loads((run / "config.json").read_text(encoding="utf-8"))
    meta["schema_version"] = 99
    (run / "config.json").write_text(json.dumps(meta), encoding="utf-8")


def _missing(run: Path) -> None:
    shutil.rmtree(run)


def _a_file(run: Path) -> None:
    shutil.rmtree(run)
    run.write_text("not a folder", encoding="utf-8")


@pytest.mark.parametrize("command", ["report", "simulate"])
@pytest.mark.parametrize("damage, match", [
    (_missing, r"does not exist"),
    (_a_file, r"is not a folder"),
    (_header_only, r"no layer records"),
    (_no_layers, r"no layer records"),
    (_short_row, r"layers\.csv, line 3: expected \d+ fields"),
    (_bad_header, r"unexpected CSV header"),
    (_config_garbage, r"config\.json is not valid JSON"),
    (_config_empty, r"config\.json is not valid JSON"),
    (_config_missing, r"config\.json is missing"),
    (_future_schema, r"schema_version 99.*upgrade lipfast"),
])  # fmt: skip
def test_report_and_simulate_on_a_bad_run_folder(run_copy, capsys, command, damage, match):
    damage(run_copy)
    line = usage_error(capsys, [command, str(run_copy), *(["--paths", "256"] if command == "simulate" else [])],
                       match)
    assert line.startswith(f"lipfast {command}: error: ")
    if run_copy.is_dir():
        assert not (run_copy / "report.html").exists() and not (run_copy / "sde_layers.csv").exists()


@pytest.mark.parametrize("paths", ["1", "0", "-5"])
def test_simulate_needs_two_paths(run_copy, capsys, paths):
    usage_error(capsys, ["simulate", str(run_copy), "--paths", paths], r"--paths must be >= 2")
    assert not (run_copy / "sde_layers.csv").exists()


# ----------------------------------------------------------------------------------------------
# Help, python -m lipfast, the console script
# ----------------------------------------------------------------------------------------------


def test_train_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    stdout, _ = capsys.readouterr()
    for name in TrainConfig().to_dict():
        assert "--" + name.replace("_", "-") in stdout, name
    for flag in ("--config", "--out", "--overwrite", "--resume", "--no-report"):
        assert flag in stdout


def test_python_m_lipfast_help():
    proc = subprocess.run([sys.executable, "-m", "lipfast", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    for command in ("demo", "train", "report", "simulate"):
        assert command in proc.stdout
    assert proc.stderr == ""


def test_console_script_usage_error(tmp_path):
    script = Path(sys.executable).parent / "lipfast"
    if not script.exists():
        pytest.skip("the lipfast console script is not installed next to this Python")
    proc = subprocess.run([str(script), "simulate", str(tmp_path / "missing")], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------
# The README's command lines (CI runs the test line)
# ----------------------------------------------------------------------------------------------


def _line_after(marker: str, text: str) -> str:
    lines = text.splitlines()
    i = lines.index(marker)
    rest = [ln for ln in lines[i + 1:] if not ln.startswith("```")]
    return rest[0]


def test_readme_command_lines_and_ci_extraction():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    demo = _line_after("<!-- demo-command -->", readme)
    test = _line_after("<!-- test-command -->", readme)
    assert demo.rstrip().endswith("lipfast demo"), demo
    assert re.search(r"(^|&&\s*)(python3? -m )?pytest\b", test), test
    for line in (demo, test):
        assert "pip install" in line and "--no-build-isolation" in line

    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    m = re.search(r"cmd=\$\(awk '(.+?)' README\.md\)", ci)
    assert m, "the awk extraction of .ci/run was not found"
    if shutil.which("awk") is None:
        pytest.skip("awk is not installed")
    proc = subprocess.run(["awk", m.group(1), "README.md"], capture_output=True, text=True, cwd=REPO,
                          timeout=30, env={**os.environ, "LC_ALL": "C"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip("\n") == test
