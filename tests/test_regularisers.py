"""Mixup, label smoothing, and the BatchNorm-folded bound of a tracked run (lipfast.train)."""

from __future__ import annotations

import csv

import pytest
import torch

from lipfast.tracker import LipfastWarning
from lipfast import runio
from lipfast.train import ConfigError, TrainConfig, train

# The BatchNorm runs here are about the scale it adds to K; the tracker's warning about BatchNorm coupling the
# samples is checked in test_regularisers' first test and in test_train.
pytestmark = pytest.mark.filterwarnings("ignore:lipfast. the model has BatchNorm layers:lipfast.tracker.LipfastWarning")

BN = dict(dataset="digits", n_samples=200, batch_size=16, model="cnn", widths=(4, 4), batchnorm=True, rank=2,
          steps=6, checkpoint_every=3, eval_every=100, sde_paths=16)
MLP = dict(dataset="digits", n_samples=200, batch_size=16, widths=(8,), rank=2, steps=5, checkpoint_every=100,
           eval_every=100, sde_paths=16)


def losses(path) -> list[float]:
    return [r["loss"] for r in runio.load_run(path).network]


def test_mixup_and_label_smoothing_change_the_loss_and_are_reproducible(tmp_path):
    plain = losses(train(TrainConfig(**MLP), tmp_path / "p", quiet=True, report=False))
    mix = losses(train(TrainConfig(**MLP, mixup=0.4), tmp_path / "m", quiet=True, report=False))
    again = losses(train(TrainConfig(**MLP, mixup=0.4), tmp_path / "m2", quiet=True, report=False))
    smooth = losses(train(TrainConfig(**MLP, label_smoothing=0.2), tmp_path / "s", quiet=True, report=False))
    assert mix == again and mix[0] != plain[0] and smooth[0] != plain[0]
    # Smoothing towards the uniform target raises the loss of confident-wrong and confident-right
    # predictions alike; at initialisation (near-uniform logits) the two differ little.
    assert smooth[0] == pytest.approx(plain[0], rel=0.05)


@pytest.mark.parametrize("name, value, match", [
    ("mixup", -0.1, "mixup must be a number >= 0"),
    ("label_smoothing", 1.0, r"label_smoothing must be a number in \[0, 1\)"),
])
def test_bad_regulariser_options_name_themselves(name, value, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_mapping({name: value})


def _bn_rows(path) -> list[list[str]]:
    return list(csv.reader((path / runio.BATCHNORM_FILE).read_text().splitlines()))


def test_batchnorm_scale_is_recorded_and_folded_into_the_bound(tmp_path):
    with pytest.warns(LipfastWarning, match="BatchNorm"):  # the tracker says what BatchNorm does to the samples
        out = train(TrainConfig(**BN, mixup=0.2), tmp_path / "bn", quiet=True, report=False)
    rows = _bn_rows(out)
    assert rows[0] == ["step", "log_scale", "log_scale:features.1", "log_scale:features.5"]
    assert [int(r[0]) for r in rows[1:]] == list(range(6))
    s = runio.read_summary(out)["batchnorm"]
    # The last row from the final model: max_c |gamma_c| / sqrt(running_var_c + eps) per BatchNorm.
    state = torch.load(out / runio.CHECKPOINT_FILE, weights_only=True)["model"]
    for name in ("features.1", "features.5"):
        scale = (state[f"{name}.weight"].double().abs() / (state[f"{name}.running_var"].double() + 1e-5).sqrt()).max()
        assert s["log_scale"][name] == pytest.approx(float(scale.log()), rel=1e-9)
    run = runio.load_run(out)
    assert s["log_bound"] == pytest.approx(run.network[-1]["log_bound_next"])
    assert s["log_bound_folded"] == pytest.approx(s["log_bound"] + sum(s["log_scale"].values()))
    assert float(rows[-1][1]) == pytest.approx(sum(s["log_scale"].values()))
    from lipfast import report

    assert "with each BatchNorm's running scale folded in" in report.summary_table(out)


def test_resumed_batchnorm_mixup_run_equals_an_uninterrupted_one(tmp_path):
    full = train(TrainConfig(**BN, mixup=0.3), tmp_path / "full", quiet=True, report=False)
    part = tmp_path / "part"
    train(TrainConfig(**BN, mixup=0.3), part, quiet=True, report=False, max_steps=4)  # checkpoint at 3
    train(TrainConfig(**BN, mixup=0.3), part, quiet=True, report=False, resume=True)
    assert _bn_rows(part) == _bn_rows(full)
    assert losses(part) == losses(full)


def test_no_batchnorm_file_without_batchnorm(tmp_path):
    out = train(TrainConfig(**MLP), tmp_path / "p", quiet=True, report=False)
    assert not (out / runio.BATCHNORM_FILE).exists()
    assert "batchnorm" not in runio.read_summary(out)
