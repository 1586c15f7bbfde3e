"""The compiled extension loads, reports its build facts honestly, and registers every op schema."""

from __future__ import annotations

import importlib

import pytest
import torch

import lipfast

EXPECTED_SCHEMAS = {
    "subspace_iteration": (
        "lipfast::subspace_iteration(Tensor W, Tensor V0, int k, int max_iters, float tol, Tensor? right=None, "
        "Tensor? left=None) -> (Tensor U, Tensor S, Tensor V, Tensor residual, Tensor iters, Tensor next, "
        "Tensor W_right, Tensor Wt_left)"
    ),
    "hessian_contract": (
        "lipfast::hessian_contract(Tensor a, Tensor b, Tensor xnorm2, Tensor ynorm2, Tensor S, float sigma_next) -> "
        "(Tensor value, Tensor lo, Tensor hi)"
    ),
    "persample_linear": (
        "lipfast::persample_linear(Tensor X, Tensor D, Tensor U, Tensor S, Tensor V, float sigma_next) -> "
        "(Tensor proj, Tensor hess, Tensor hess_lo, Tensor hess_hi)"
    ),
    "gradient_statistics": (
        "lipfast::gradient_statistics(Tensor proj, Tensor hess, Tensor hess_lo, Tensor hess_hi, Tensor G, Tensor U, "
        "Tensor S, Tensor V, float sigma_next, float scale, float loss_factor, Tensor? Gv1=None, "
        "Tensor? Gtu1=None, Tensor? known=None, float known_scale=0.) -> Tensor"
    ),
    "hessian_tail": (
        "lipfast::hessian_tail(Tensor W, Tensor x, Tensor y, Tensor U, Tensor S, Tensor V, float sigma_next, "
        "int max_iters, float tol, float atol=0.) -> Tensor"
    ),
    "update_statistics": (
        "lipfast::update_statistics(Tensor x, Tensor y, Tensor U, Tensor S, Tensor V, float sigma_next) -> Tensor"
    ),
    "track_update": (
        "lipfast::track_update(Tensor W, Tensor basis, Tensor U, Tensor S, Tensor V, float sigma_next, Tensor Wt_u1, "
        "int max_iters, float tol, bool exact, int cluster=1, bool solve_tail=True) -> (Tensor U, Tensor S, Tensor V, Tensor sigma_next, "
        "Tensor residuals, "
        "Tensor basis, Tensor Wt_u1, Tensor stats)"
    ),
    "conv2d_projections": (
        "lipfast::conv2d_projections(Tensor x, Tensor grad_out, Tensor u1, Tensor v1, int[2] kernel_size, "
        "int[2] stride, int[2] padding, int[2] dilation) -> (Tensor Gv1, Tensor Gtu1)"
    ),
    "persample_conv2d": (
        "lipfast::persample_conv2d(Tensor x, Tensor grad_out, Tensor U, Tensor S, Tensor V, float sigma_next, "
        "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) -> (Tensor proj, Tensor hess, "
        "Tensor hess_lo, Tensor hess_hi, Tensor Gv1, Tensor Gtu1)"
    ),
    "persample_linear_precond": (
        "lipfast::persample_linear_precond(Tensor X, Tensor D, Tensor P, Tensor U, Tensor S, Tensor V, "
        "float sigma_next) -> (Tensor proj, Tensor hess, Tensor hess_lo, Tensor hess_hi, Tensor Gv1, Tensor Gtu1)"
    ),
    "persample_conv2d_precond": (
        "lipfast::persample_conv2d_precond(Tensor x, Tensor grad_out, Tensor P, Tensor U, Tensor S, Tensor V, "
        "float sigma_next, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) -> (Tensor proj, "
        "Tensor hess, Tensor hess_lo, Tensor hess_hi, Tensor Gv1, Tensor Gtu1)"
    ),
}


def test_extension_imports():
    C = importlib.import_module("lipfast._C")
    assert C is lipfast._C
    assert isinstance(C.version, str) and C.version
    assert lipfast.__version__ == C.version


def test_with_cuda_is_a_bool_and_false_on_cpu_torch():
    assert type(lipfast._C.with_cuda) is bool
    if torch.version.cuda is None:
        # A CPU wheel of torch ships ATen/cuda headers but no libtorch_cuda: no CUDA kernels can exist.
        assert lipfast._C.with_cuda is False


def test_built_against_the_running_torch():
    assert lipfast._C.torch_version == torch.__version__


@pytest.mark.parametrize("name", sorted(EXPECTED_SCHEMAS))
def test_schema_registered(name):
    packet = getattr(torch.ops.lipfast, name)
    assert str(packet.default._schema) == EXPECTED_SCHEMAS[name]


def test_persample_linear_sums_overload_registered():
    assert str(torch.ops.lipfast.persample_linear.sums._schema) == (
        "lipfast::persample_linear.sums(Tensor X, Tensor D, Tensor U, Tensor S, Tensor V, float sigma_next) -> "
        "(Tensor proj, Tensor hess, Tensor hess_lo, Tensor hess_hi, Tensor Gv1, Tensor Gtu1)")


def test_every_op_has_a_wrapper_and_is_listed():
    """A new op needs its schema here, a typed wrapper in lipfast.ops and a twin in lipfast.reference."""
    from lipfast import ops, reference
    assert sorted(ops.__all__) == sorted(EXPECTED_SCHEMAS)
    for name in ops.__all__:
        assert hasattr(torch.ops.lipfast, name)
        assert callable(getattr(reference, name)), f"lipfast.reference has no twin of {name}"


def test_public_names_exist():
    assert lipfast.__all__, "lipfast.__all__ is empty"
    assert len(set(lipfast.__all__)) == len(lipfast.__all__)
    missing = [name for name in lipfast.__all__ if not hasattr(lipfast, name)]
    assert missing == []
    for name in ("spectrum", "hessian_form", "persample", "persample_conv2d", "Spectrum", "HessianForm", "PerSample"):
        assert name in lipfast.__all__


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and lipfast._C.with_cuda),
                    reason="needs a CUDA device and lipfast built with CUDA kernels")
def test_cuda_kernels_registered():
    dev = "cuda"
    W = torch.randn(5, 4, device=dev)
    U, S, V, res, it, nxt, _, _ = torch.ops.lipfast.subspace_iteration(W, torch.randn(4, 2, device=dev), 1, 2, 0.0)
    assert U.device.type == dev and S.device.type == dev
    a = torch.randn(3, 2, device=dev)
    value, lo, hi = torch.ops.lipfast.hessian_contract(a, a, (a * a).sum(1) + 1, (a * a).sum(1) + 1,
                                                       torch.tensor([2.0, 1.0], device=dev), 0.0)
    assert value.device.type == dev
    X, D = torch.randn(3, 1, 4, device=dev), torch.randn(3, 1, 5, device=dev)
    out = torch.ops.lipfast.persample_linear(X, D, U, S, V, 0.5)
    assert all(t.device.type == dev for t in out)
