"""Tracked training runs (lipfast.train): tiny configs of every model, the SGD options, the
config file, and resume after an interruption giving records equal to an uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from lipfast import runio
from lipfast.train import ConfigError, TrainConfig, load_config_file, train

# digits, 200 samples -> 160 train / 40 test; batch 32 -> 5 steps per epoch.
TINY = dict(dataset="digits", n_samples=200, batch_size=32, widths=(16, 16), rank=4, steps=6,
            checkpoint_every=3, eval_every=100, sde_paths=64)


def tiny(**over) -> TrainConfig:
    return TrainConfig(**{**TINY, **over})


def run_tiny(out, *, report=False, **over):
    return train(tiny(**over), out, quiet=True, report=report)


def n_tracked_layers(run: runio.Run) -> int:
    return len(run.layer_names)


def assert_same_records(a: list[dict], b: list[dict], what: str) -> None:
    """Row-by-row, column-by-column exact equality of parsed records; NaN equals NaN."""
    assert len(a) == len(b), f"{what}: {len(a)} rows vs {len(b)}"
    for i, (ra, rb) in enumerate(zip(a, b)):
        assert ra.keys() == rb.keys()
        for k in ra:
            va, vb = ra[k], rb[k]
            if isinstance(va, float) and isinstance(vb, float) and math.isnan(va) and math.isnan(vb):
                continue
            assert va == vb, f"{what} row {i} (step {ra.get('step')}, {ra.get('layer', '')}) column {k}: {va!r} != {vb!r}"


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


def test_defaults_validate_and_round_trip_through_a_mapping():
    cfg = TrainConfig()
    cfg.validate()
    d = cfg.to_dict()
    assert d["widths"] == list(cfg.widths)
    assert set(d) == {f.name for f in dataclasses.fields(TrainConfig)}
    back = TrainConfig.from_mapping(d)
    assert back == cfg and isinstance(back.widths, tuple)


@pytest.mark.parametrize("name, value, match", [
    ("dataset", "imagenet", "dataset"),
    ("model", "transformer", "model"),
    ("lr", 0.0, "lr"),
    ("lr", -0.1, "lr"),
    ("lr", math.nan, "lr"),
    ("batch_size", 0, "batch_size"),
    ("label_noise", 1.0, "label_noise"),
    ("label_noise", -0.1, "label_noise"),
    ("momentum", 1.0, "momentum"),
    ("weight_decay", -1e-4, "weight_decay"),
    ("widths", (), "widths"),
    ("widths", (16, 0), "widths"),
    ("steps", 0, "steps"),
    ("rank", 0, "rank"),
    ("checkpoint_every", 0, "checkpoint_every"),
    ("dtype", "float16", "dtype"),
    ("nesterov", True, "nesterov"),  # without momentum
    ("n_samples", 1, "n_samples"),
    ("batch_size", True, "batch_size"),  # a bool is not an int
    ("optimizer", "lion", "optimizer"),
])  # fmt: skip
def test_bad_options_raise_config_error_naming_them(name, value, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_mapping({name: value})


def test_unknown_option_suggests_the_close_name():
    with pytest.raises(ConfigError, match=r"'batch_sise'.*did you mean 'batch_size'"):
        TrainConfig.from_mapping({"batch_sise": 8})
    with pytest.raises(ConfigError, match="unknown option 'zzz'"):
        TrainConfig.from_mapping({"zzz": 1})


def test_epochs_replace_the_default_steps_and_exclude_explicit_steps():
    cfg = TrainConfig.from_mapping({"epochs": 2})
    assert cfg.steps is None and cfg.epochs == 2
    with pytest.raises(ConfigError, match="steps and epochs exclude each other"):
        TrainConfig.from_mapping({"epochs": 2, "steps": 10})
    with pytest.raises(ConfigError, match="steps and epochs exclude each other"):
        TrainConfig(epochs=2).validate()  # the default steps=300 would silently win otherwise
    with pytest.raises(ConfigError, match="steps"):
        TrainConfig.from_mapping({"steps": None})


def test_load_config_file(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text('dataset = "digits"\nwidths = [8, 4]\nlr = 0.1\nnesterov = false\n', encoding="utf-8")
    values = load_config_file(p)
    assert values == {"dataset": "digits", "widths": [8, 4], "lr": 0.1, "nesterov": False}
    cfg = TrainConfig.from_mapping(values, where=str(p))
    assert cfg.widths == (8, 4) and cfg.lr == 0.1

    bad = tmp_path / "bad.toml"
    bad.write_text("lr = = 0.1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config_file(bad)
    nested = tmp_path / "nested.toml"
    nested.write_text("[train]\nlr = 0.1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="tables are not supported"):
        load_config_file(nested)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.toml")


# ----------------------------------------------------------------------------------------------
# Tiny runs of every model
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, widths, kinds", [
    ("mlp", (16, 16), {"linear"}),
    ("cnn", (4, 4), {"conv2d", "linear"}),
    ("resnet", (4,), {"conv2d", "linear"}),
])  # fmt: skip
def test_tiny_run_of_each_model(tmp_path, model, widths, kinds):
    out = run_tiny(tmp_path / "run", model=model, widths=widths, steps=4, checkpoint_every=2)
    assert out == tmp_path / "run"
    for name in ("config.json", "layers.csv", "network.csv", "summary.json", "checkpoint.pt"):
        assert (out / name).is_file(), name
    assert not (out / "report.html").exists()  # report=False

    run = runio.load_run(out)
    assert run.dropped_lines == 0
    assert run.meta["schema_version"] == runio.SCHEMA_VERSION
    assert run.config == tiny(model=model, widths=widths, steps=4, checkpoint_every=2).to_dict()
    n_layers = n_tracked_layers(run)
    assert n_layers >= 2
    assert {r["kind"] for r in run.layers} == kinds
    # one row per (step, layer), steps 0..3 in order, one network row per step
    assert len(run.layers) == 4 * n_layers
    assert [r["step"] for r in run.network] == [0, 1, 2, 3]
    assert sorted({r["step"] for r in run.layers}) == [0, 1, 2, 3]
    for r in run.layers:
        assert r["batch"] == 32 and r["lr"] == pytest.approx(0.05)
        assert r["sigma"] > 0 and math.isfinite(r["sigma_next"])
        assert r["delta_obs"] == pytest.approx(r["sigma_next"] - r["sigma"], rel=1e-6, abs=1e-9)
    # the network bound is the sum of the layer log norms
    for net in run.network:
        layer_sum = sum(math.log(r["sigma"]) for r in run.layers if r["step"] == net["step"])
        assert net["log_bound"] == pytest.approx(layer_sum, rel=1e-6, abs=1e-9)
        assert math.isfinite(net["loss"]) and 0.0 <= net["train_acc"] <= 1.0

    s = run.summary
    assert s["finished"] is True and s["steps"] == 4 and s["n_train"] == 160
    assert 0.0 <= s["test_acc"] <= 1.0 and math.isfinite(s["train_loss"])
    assert s["layers"] == run.layer_names


def test_sgd_options_are_used_and_recorded(tmp_path):
    """Momentum, Nesterov, weight decay and label noise run, are stored in config.json and change
    the records (each against the same plain-SGD baseline)."""
    base = runio.load_run(run_tiny(tmp_path / "base", steps=4))
    variants = {
        "momentum": dict(momentum=0.9),
        "nesterov": dict(momentum=0.9, nesterov=True),
        "weight_decay": dict(weight_decay=0.05),
        "label_noise": dict(label_noise=0.5, noise_seed=3),
        "lr": dict(lr=0.2),
    }
    for name, opts in variants.items():
        run = runio.load_run(run_tiny(tmp_path / name, steps=4, **opts))
        for k, v in opts.items():
            assert run.config[k] == v, (name, k)
        assert run.summary["finished"] is True
        assert len(run.layers) == len(base.layers)
        # step 0 starts from the same weights: same sigma; after it the update differs
        first = [r for r in run.layers if r["step"] == 0]
        first_base = [r for r in base.layers if r["step"] == 0]
        assert [r["sigma"] for r in first] == [r["sigma"] for r in first_base], name
        later = [r["sigma"] for r in run.layers if r["step"] == 3]
        later_base = [r["sigma"] for r in base.layers if r["step"] == 3]
        assert later != later_base, name
        if name == "lr":
            assert {r["lr"] for r in run.layers} == {0.2}
        if name == "label_noise":
            # same data, same init, same first batch: only the labels (hence the loss) differ
            assert run.network[0]["loss"] != base.network[0]["loss"]


def test_adam_options_are_refused_with_momentum():
    with pytest.raises(ConfigError, match=r"momentum.*0 with optimizer 'adamw'"):
        TrainConfig.from_mapping({"optimizer": "adamw", "momentum": 0.9})


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adaptive_optimizer_runs_resume_and_are_modelled(tmp_path, optimizer):
    """--optimizer adam/adamw: config.json has it, no record is sgd_equivalent, drift = first_order (the
    frozen preconditioner makes the known step plus the fresh part the whole first order), and a resumed
    run (Adam's moments and step count come back) equals an uninterrupted one."""
    cfg = tiny(steps=6, checkpoint_every=3, optimizer=optimizer, lr=0.003, weight_decay=0.01)
    ref = _uninterrupted(tmp_path, cfg)
    assert ref.config["optimizer"] == optimizer
    assert all("sgd_equivalent" not in r["flag_names"] for r in ref.layers)
    for r in ref.layers:
        assert math.isclose(r["drift"], r["first_order"], rel_tol=1e-3, abs_tol=1e-7), r
    out = tmp_path / "resumed"
    train(cfg, out, quiet=True, report=False, max_steps=4)
    train(cfg, out, resume=True, quiet=True, report=False)
    assert_same_records(runio.load_run(out).layers, ref.layers, "layers.csv")


def test_weight_decay_adds_its_drift_term(tmp_path):
    """With weight decay the drift gains -lr*wd*sigma on each layer (API.md, drift)."""
    wd = 0.1
    base = runio.load_run(run_tiny(tmp_path / "base", steps=1))
    dec = runio.load_run(run_tiny(tmp_path / "wd", steps=1, weight_decay=wd))
    for rb, rd in zip(base.layers, dec.layers):
        assert rb["layer"] == rd["layer"] and rb["sigma"] == rd["sigma"]
        if rb["degenerate"] or rd["degenerate"]:
            continue
        assert rd["drift"] - rb["drift"] == pytest.approx(-0.05 * wd * rb["sigma"], rel=1e-3, abs=1e-7)


def test_epochs_instead_of_steps(tmp_path):
    run = runio.load_run(run_tiny(tmp_path / "run", steps=None, epochs=2))
    # 160 train samples, batch 32, drop_last -> 5 steps per epoch
    assert run.summary["steps"] == 10
    assert [r["step"] for r in run.network] == list(range(10))


def test_every_tracks_only_every_kth_step(tmp_path):
    run = runio.load_run(run_tiny(tmp_path / "run", steps=6, every=3))
    assert [r["step"] for r in run.network] == [0, 3]
    assert run.summary["steps"] == 6


def test_batch_larger_than_the_training_set_is_a_config_error_and_leaves_no_folder(tmp_path):
    with pytest.raises(ConfigError, match="batch_size"):
        run_tiny(tmp_path / "run", batch_size=500)
    with pytest.raises(ValueError, match="n_samples"):
        run_tiny(tmp_path / "run", n_samples=10**6)
    assert not (tmp_path / "run").exists()  # a corrected rerun needs no --overwrite
    run_tiny(tmp_path / "run", steps=1)


def test_report_at_the_end(tmp_path):
    out = run_tiny(tmp_path / "run", report=True, steps=3)
    assert (out / "report.html").is_file()
    assert list((out / "figures").glob("*.png"))
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["finished"] is True and "sde" in summary and summary["sde"]["n_paths"] == 64


# ----------------------------------------------------------------------------------------------
# Run folders: refusing, overwriting, resuming
# ----------------------------------------------------------------------------------------------


def test_existing_run_needs_overwrite_or_resume(tmp_path):
    out = run_tiny(tmp_path / "run", steps=2)
    with pytest.raises(runio.RunFolderError, match="already holds a lipfast run"):
        run_tiny(out, steps=2)
    train(tiny(steps=3), out, overwrite=True, quiet=True, report=False)
    assert runio.load_run(out).summary["steps"] == 3


def test_non_run_folder_is_refused_unless_overwrite_and_user_files_survive(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(runio.RunFolderError, match="not a lipfast run folder"):
        run_tiny(out, steps=2)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    with pytest.raises(runio.RunFolderError, match="cannot resume"):
        train(tiny(steps=2), out, resume=True, quiet=True, report=False)
    train(tiny(steps=2), out, overwrite=True, quiet=True, report=False)
    assert (out / "notes.txt").read_text(encoding="utf-8") == "keep me"
    assert runio.load_run(out).summary["finished"] is True


def test_overwrite_and_resume_exclude_each_other(tmp_path):
    with pytest.raises(ValueError, match="exclusive"):
        train(tiny(steps=2), tmp_path / "run", overwrite=True, resume=True, quiet=True, report=False)


def test_interrupted_run_keeps_its_records_and_has_no_finished_summary(tmp_path):
    out = train(tiny(steps=10, checkpoint_every=4), tmp_path / "run", quiet=True, report=False, max_steps=6)
    run = runio.load_run(out)
    assert [r["step"] for r in run.network] == list(range(6))
    assert (run.summary or {}).get("finished") is not True
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert int(state["step"]) == 4


def _uninterrupted(tmp_path, cfg: TrainConfig) -> runio.Run:
    return runio.load_run(train(cfg, tmp_path / "straight", quiet=True, report=False))


@pytest.mark.parametrize("checkpoint_every, k", [
    (3, 6),   # checkpoint_every divides K: nothing to drop on resume
    (4, 7),   # it does not: steps 4..6 were recorded after the last checkpoint and are redone
    (5, 11),  # crosses two epochs (5 steps each); the checkpoint is at an epoch boundary
])  # fmt: skip
def test_resume_equals_an_uninterrupted_run(tmp_path, checkpoint_every, k):
    # momentum: optimizer state must come back; rank < min(m, n): warm-start spectra must come back
    cfg = tiny(steps=13, checkpoint_every=checkpoint_every, momentum=0.9, weight_decay=1e-3, label_noise=0.2,
               rank=3)
    ref = _uninterrupted(tmp_path, cfg)

    out = tmp_path / "resumed"
    train(cfg, out, quiet=True, report=False, max_steps=k)
    part = runio.load_run(out)
    assert [r["step"] for r in part.network] == list(range(k))  # rows past the checkpoint are on disk
    last_ckpt = (k // checkpoint_every) * checkpoint_every
    assert int(torch.load(out / "checkpoint.pt", weights_only=True)["step"]) == last_ckpt

    train(cfg, out, resume=True, quiet=True, report=False)
    got = runio.load_run(out)
    assert_same_records(got.layers, ref.layers, "layers.csv")
    assert_same_records(got.network, ref.network, "network.csv")
    assert got.dropped_lines == 0
    assert got.summary["finished"] is True and got.summary["steps"] == 13
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert got.summary[key] == ref.summary[key], key
    assert len(got.meta.get("resumed", [])) == 1
    assert got.meta["created"] == part.meta["created"]


def test_resume_twice_and_after_a_partial_line(tmp_path):
    """Two interruptions, the second one leaving a half-written line in each CSV (a killed
    process), then resume: still equal to the uninterrupted run."""
    cfg = tiny(steps=9, checkpoint_every=2)
    ref = _uninterrupted(tmp_path, cfg)
    out = tmp_path / "resumed"
    train(cfg, out, quiet=True, report=False, max_steps=3)
    train(cfg, out, resume=True, quiet=True, report=False, max_steps=3)  # steps 2..4
    with open(out / "layers.csv", "ab") as f:
        f.write(b"5,1,linear,16,64,32,0.05,1.2")
    with open(out / "network.csv", "ab") as f:
        f.write(b"5,0.1")
    assert runio.load_run(out).dropped_lines == 2
    train(cfg, out, resume=True, quiet=True, report=False)
    got = runio.load_run(out)
    assert_same_records(got.layers, ref.layers, "layers.csv")
    assert_same_records(got.network, ref.network, "network.csv")
    assert got.dropped_lines == 0
    assert len(got.meta["resumed"]) == 2


def test_resume_before_the_first_checkpoint_starts_over(tmp_path):
    cfg = tiny(steps=5, checkpoint_every=4)
    ref = _uninterrupted(tmp_path, cfg)
    out = tmp_path / "resumed"
    train(cfg, out, quiet=True, report=False, max_steps=2)  # no checkpoint written yet
    assert not (out / "checkpoint.pt").exists()
    train(cfg, out, resume=True, quiet=True, report=False)
    got = runio.load_run(out)
    assert_same_records(got.layers, ref.layers, "layers.csv")
    assert_same_records(got.network, ref.network, "network.csv")


def test_resume_of_a_finished_run_changes_no_records(tmp_path):
    cfg = tiny(steps=4, checkpoint_every=2)
    out = train(cfg, tmp_path / "run", quiet=True, report=False)
    before = runio.load_run(out)
    train(cfg, out, resume=True, quiet=True, report=False)
    after = runio.load_run(out)
    assert_same_records(after.layers, before.layers, "layers.csv")
    assert_same_records(after.network, before.network, "network.csv")
    assert after.summary["finished"] is True


def test_resume_with_other_options_is_refused(tmp_path):
    cfg = tiny(steps=6, checkpoint_every=2)
    out = train(cfg, tmp_path / "run", quiet=True, report=False, max_steps=3)
    before = (out / "layers.csv").read_bytes()
    for change in (dict(lr=0.1), dict(widths=(8,)), dict(seed=1), dict(model="cnn", widths=(4,)),
                   dict(label_noise=0.1), dict(rank=2)):
        with pytest.raises(ConfigError, match="cannot resume .* other options"):
            train(dataclasses.replace(cfg, **change), out, resume=True, quiet=True, report=False)
    assert (out / "layers.csv").read_bytes() == before
    # steps, checkpoint and logging cadence, SDE options may change
    train(dataclasses.replace(cfg, steps=8, checkpoint_every=3, eval_every=7, sde_paths=32), out, resume=True,
          quiet=True, report=False)
    run = runio.load_run(out)
    assert run.summary["steps"] == 8 and run.config["steps"] == 8


def test_resume_can_extend_a_finished_run(tmp_path):
    ref = _uninterrupted(tmp_path, tiny(steps=7, checkpoint_every=3))
    out = train(tiny(steps=4, checkpoint_every=3), tmp_path / "run", quiet=True, report=False)
    train(tiny(steps=7, checkpoint_every=3), out, resume=True, quiet=True, report=False)
    got = runio.load_run(out)
    assert_same_records(got.layers, ref.layers, "layers.csv")
    assert_same_records(got.network, ref.network, "network.csv")
