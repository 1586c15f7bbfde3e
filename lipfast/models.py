"""Small classifiers whose Lipschitz constant is tracked during training.

:func:`build_model` makes one of :data:`MODELS` from plain ``torch.nn`` layers (``Linear``,
``Conv2d`` with ``groups=1``, ``ReLU``, pooling, optional ``BatchNorm``), so that hook-based
instrumentation finds every weight as an ``nn.Linear`` or ``nn.Conv2d``:

* ``"mlp"``: ``Flatten`` then ``Linear`` layers of the given widths with ReLU; any input shape.
* ``"cnn"``: one 3x3 convolution + ReLU (+ 2x2 max-pool while the image is at least 4x4) per
  width, then a ``Linear`` head; image inputs ``(C, H, W)`` such as 1x8x8 digits, 1x28x28
  MNIST or 3x32x32 CIFAR.
* ``"resnet"``: a 3x3 stem convolution, one residual basic block per width (identity shortcut,
  or a 1x1 convolution where the width or resolution changes), global average pooling and a
  ``Linear`` head; image inputs. No normalisation unless ``batchnorm=True``.

Initialisation is PyTorch's default, drawn under ``seed`` without disturbing the global RNG,
then every ``Linear``/``Conv2d`` weight is multiplied by ``init_scale`` (biases untouched).
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
from torch import nn

__all__ = ["MODELS", "MLP", "SmallCNN", "SmallResNet", "ResNet18", "BasicBlock", "build_model"]

MODELS: tuple[str, ...] = ("mlp", "cnn", "resnet")
"""Every name :func:`build_model` accepts."""


class MLP(nn.Sequential):
    """``Flatten`` then ``Linear`` layers with ReLU in between (optionally ``BatchNorm1d``).

    Shapes: input ``[B, *input_shape]`` -> output ``[B, n_classes]`` (logits).

    Args:
        input_shape: Shape of one example, e.g. ``(d,)`` or ``(C, H, W)``.
        n_classes: Number of outputs.
        widths: Hidden widths, one ``Linear`` + ReLU per entry.
        batchnorm: Insert ``BatchNorm1d`` after each hidden ``Linear`` (which then has no bias).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        n_classes: int,
        widths: Sequence[int],
        *,
        batchnorm: bool = False,
    ) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = math.prod(input_shape)
        for width in widths:
            layers.append(nn.Linear(fan_in, width, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU())
            fan_in = width
        layers.append(nn.Linear(fan_in, n_classes))
        super().__init__(*layers)


class SmallCNN(nn.Module):
    """Conv3x3 + ReLU (+ MaxPool2d(2)) per width, then ``Flatten`` and a ``Linear`` head.

    A 2x2 max-pool follows a convolution while both spatial sizes are at least 4, so 8x8
    inputs go 8 -> 4 -> 2, 28x28 go 28 -> 14 -> 7 and 32x32 go 32 -> 16 -> 8 with two widths.

    Shapes: input ``[B, C, H, W]`` -> output ``[B, n_classes]`` (logits).

    Args:
        input_shape: ``(C, H, W)``.
        n_classes: Number of outputs.
        widths: Output channels of each convolution.
        batchnorm: Insert ``BatchNorm2d`` after each convolution (which then has no bias).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        n_classes: int,
        widths: Sequence[int],
        *,
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        channels, height, width = input_shape
        layers: list[nn.Module] = []
        for out_channels in widths:
            layers.append(nn.Conv2d(channels, out_channels, 3, padding=1, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU())
            if min(height, width) >= 4:
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits.

        Args:
            x: Images, shape ``[B, C, H, W]``.

        Returns:
            Logits, shape ``[B, n_classes]``.
        """
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """Residual basic block: ``relu(conv-[bn]-relu-conv-[bn](x) + shortcut(x))``.

    The shortcut is the identity when the shape is kept, else a 1x1 ``Conv2d`` with the
    block's stride (followed by ``BatchNorm2d`` when ``batchnorm``).

    Shapes: input ``[B, in_channels, H, W]`` -> output
    ``[B, out_channels, ceil(H / stride), ceil(W / stride)]``.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first convolution and of the shortcut, 1 or 2.
        batchnorm: Use ``BatchNorm2d`` after each convolution (which then has no bias).
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, *, batchnorm: bool = False
    ) -> None:
        super().__init__()
        bias = not batchnorm
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = nn.BatchNorm2d(out_channels) if batchnorm else nn.Identity()
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias)
        self.norm2 = nn.BatchNorm2d(out_channels) if batchnorm else nn.Identity()
        self.relu2 = nn.ReLU()
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            projection = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias)
            norm = nn.BatchNorm2d(out_channels) if batchnorm else nn.Identity()
            self.shortcut = nn.Sequential(projection, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block output.

        Args:
            x: Feature maps, shape ``[B, in_channels, H, W]``.

        Returns:
            Feature maps, shape ``[B, out_channels, ceil(H / stride), ceil(W / stride)]``.
        """
        out = self.relu1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem conv3x3, one :class:`BasicBlock` per width, global average pool, ``Linear`` head.

    The stem has ``widths[0]`` channels. Block ``i`` maps to ``widths[i]`` channels; every block
    after the first has stride 2 while both spatial sizes are at least 4 (8x8 -> 8 -> 4 with
    two widths; 32x32 -> 32 -> 16).

    Shapes: input ``[B, C, H, W]`` -> output ``[B, n_classes]`` (logits).

    Args:
        input_shape: ``(C, H, W)``.
        n_classes: Number of outputs.
        widths: Channels of each residual block (the stem uses ``widths[0]``).
        batchnorm: Use ``BatchNorm2d`` after every convolution; otherwise no normalisation.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        n_classes: int,
        widths: Sequence[int],
        *,
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.stem = nn.Sequential(
            nn.Conv2d(channels, widths[0], 3, padding=1, bias=not batchnorm),
            nn.BatchNorm2d(widths[0]) if batchnorm else nn.Identity(),
            nn.ReLU(),
        )
        blocks = []
        channels = widths[0]
        for i, out_channels in enumerate(widths):
            stride = 2 if i > 0 and min(height, width) >= 4 else 1
            blocks.append(BasicBlock(channels, out_channels, stride, batchnorm=batchnorm))
            height, width = -(-height // stride), -(-width // stride)
            channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits.

        Args:
            x: Images, shape ``[B, C, H, W]``.

        Returns:
            Logits, shape ``[B, n_classes]``.
        """
        return self.head(self.blocks(self.stem(x)))


class ResNet18(nn.Module):
    """ResNet-18 in torchvision's layout (He et al. 2016): a 7x7 stride-2 stem with BatchNorm and a 3x3
    max-pool, four stages of two :class:`BasicBlock` each (64, 128, 256, 512 channels; stride 2 from the
    second stage on, 1x1 projection shortcuts), global average pool and a ``Linear`` head. 11.2M parameters
    for 10 classes; the benchmark and test model of a real convnet (without torchvision).

    Shapes: input ``[B, C, H, W]`` (e.g. 3x32x32) -> output ``[B, n_classes]`` (logits).
    """

    def __init__(self, in_channels: int = 3, n_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
                                  nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1))
        stages, channels = [], 64
        for i, width in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(channels, width, stride, batchnorm=True),
                                        BasicBlock(width, width, 1, batchnorm=True)))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def build_model(
    name: str,
    input_shape: Sequence[int],
    n_classes: int,
    *,
    widths: Sequence[int] = (64, 64),
    init_scale: float = 1.0,
    seed: int = 0,
    batchnorm: bool = False,
) -> nn.Module:
    """Build one of :data:`MODELS` with a seeded, scaled initialisation.

    Args:
        name: ``"mlp"``, ``"cnn"`` or ``"resnet"``.
        input_shape: Shape of one example: ``(d,)`` or ``(C, H, W)`` for ``"mlp"``;
            ``(C, H, W)`` for ``"cnn"`` and ``"resnet"`` (e.g. ``Dataset.input_shape``).
        n_classes: Number of outputs (logits), at least 1.
        widths: ``"mlp"``: hidden widths; ``"cnn"``: channels of each convolution;
            ``"resnet"``: channels of each residual block. Non-empty, all positive.
        init_scale: Factor applied to every ``Linear``/``Conv2d`` weight after PyTorch's default
            initialisation; biases and normalisation parameters are untouched. Positive, finite.
        seed: Seed of the initialisation. The global RNG state is the same after the call as
            before it.
        batchnorm: Add ``BatchNorm1d``/``BatchNorm2d`` after each hidden layer/convolution.

    Returns:
        The model, in training mode, on the CPU, float32. It maps ``[B, *input_shape]`` to
        logits ``[B, n_classes]``.

    Raises:
        ValueError: Unknown ``name``; ``input_shape`` not positive integers, or not
            ``(C, H, W)`` for a convolutional model; ``n_classes < 1``; empty or non-positive
            ``widths``; ``init_scale`` not positive and finite; negative ``seed``.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    shape = _check_shape(input_shape)
    if name != "mlp" and len(shape) != 3:
        raise ValueError(
            f"model {name!r} needs image inputs with input_shape (C, H, W), got {shape}; "
            f"use 'mlp' for vector data"
        )
    if not _is_int(n_classes) or n_classes < 1:
        raise ValueError(f"n_classes must be an integer >= 1, got {n_classes!r}")
    widths = tuple(widths)
    if not widths:
        raise ValueError(
            f"widths must be a non-empty sequence of positive integers, got {widths!r}"
        )
    for w in widths:
        if not _is_int(w) or w < 1:
            raise ValueError(
                f"every width must be a positive integer, got {w!r} in widths={widths!r}"
            )
    if (
        isinstance(init_scale, bool)
        or not isinstance(init_scale, numbers.Real)
        or not math.isfinite(init_scale)
        or init_scale <= 0
    ):
        raise ValueError(f"init_scale must be a positive finite number, got {init_scale!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if not isinstance(batchnorm, bool):
        raise ValueError(f"batchnorm must be a bool, got {batchnorm!r}")

    n_classes, widths = int(n_classes), tuple(int(w) for w in widths)
    cls = {"mlp": MLP, "cnn": SmallCNN, "resnet": SmallResNet}[name]
    # Default initialisers draw from the global CPU generator: fork it so the caller's stream
    # is restored afterwards (devices=[]: the model is built on the CPU, CUDA RNGs untouched).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = cls(shape, n_classes, widths, batchnorm=batchnorm)
    if init_scale != 1:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    module.weight.mul_(float(init_scale))
    return model


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """Return ``input_shape`` as a tuple of positive ints, else raise ValueError."""
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = ()
    if not shape or any(not _is_int(s) or s < 1 for s in shape):
        raise ValueError(
            f"input_shape must be a non-empty tuple of positive integers such as (d,) or "
            f"(C, H, W), got {input_shape!r}"
        )
    return tuple(int(s) for s in shape)


def _is_int(value: object) -> bool:
    """Whether ``value`` is an integer (Python or NumPy), excluding bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
