"""lipfast: how, and why, a network's Lipschitz constant changes while it trains.

Importing lipfast loads the compiled extension ``lipfast._C``, which registers the ops under
``torch.ops.lipfast``. A missing or mismatched extension is a broken install and fails loudly here.
"""

from __future__ import annotations

import torch

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "lipfast: the compiled extension lipfast._C could not be imported "
        f"({exc}). Rebuild it against the torch you run: "
        "pip install --no-build-isolation -e ."
    ) from exc


def _check_torch_version() -> None:
    built, running = _C.torch_version, torch.__version__
    if built.split("+")[0] != running.split("+")[0]:
        raise ImportError(
            f"lipfast: the compiled extension was built against torch {built}, but torch {running} is "
            "running; C++ ops are tied to the torch they were built with. Rebuild: "
            "pip install --no-build-isolation --force-reinstall --no-deps ."
        )


_check_torch_version()

from . import ops  # noqa: E402, F401  (registers the fake kernels; needs _C loaded first)
from .tracker import LipfastWarning, Tracker  # noqa: E402
from .runio import RunWriter  # noqa: E402  (standard library only: a record sink for on_record)
from .functional import (  # noqa: E402
    HessianForm,
    PerSample,
    Spectrum,
    hessian_form,
    persample,
    persample_conv2d,
    spectrum,
)

__version__ = _C.version

__all__ = [
    "HessianForm",
    "LipfastWarning",
    "Tracker",
    "PerSample",
    "RunWriter",
    "Spectrum",
    "hessian_form",
    "persample",
    "persample_conv2d",
    "spectrum",
    "__version__",
]
