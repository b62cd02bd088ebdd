"""Backend selection and the shared validation every op relies on."""
import pytest
import torch

import dpar_kernels as dk
from dpar_kernels import _dispatch, _extension

CPU = torch.device("cpu")


def test_default_on_cpu_prefers_extension(monkeypatch):
    monkeypatch.delenv("DPAR_BACKEND", raising=False)
    expected = "cpu" if _extension.HAS_CPU_OPS else "torch"
    assert _dispatch.resolve_backend("op", None, CPU, dk.BACKENDS) == expected


def test_default_never_picks_triton_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("DPAR_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.resolve_backend("op", None, CPU, ("torch", "triton")) == "torch"


def test_environment_sets_default(monkeypatch):
    monkeypatch.setenv("DPAR_BACKEND", "torch")
    assert _dispatch.resolve_backend("op", None, CPU, dk.BACKENDS) == "torch"
    monkeypatch.setenv("DPAR_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend must be one of"):
        _dispatch.resolve_backend("op", None, CPU, dk.BACKENDS)


def test_argument_overrides_environment(monkeypatch):
    monkeypatch.setenv("DPAR_BACKEND", "cuda")
    assert _dispatch.resolve_backend("op", "torch", CPU, dk.BACKENDS) == "torch"


def test_forced_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.delenv("DPAR_BACKEND", raising=False)
    with pytest.raises(dk.BackendUnavailableError, match="'cuda'.*CUDA tensors"):
        _dispatch.resolve_backend("op", "cuda", CPU, dk.BACKENDS)
    with pytest.raises(dk.BackendUnavailableError, match="not implemented"):
        _dispatch.resolve_backend("op", "triton", CPU, ("torch",))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(dk.BackendUnavailableError, match="triton"):
        _dispatch.resolve_backend("op", "triton", CPU, dk.BACKENDS)


def test_unknown_backend_name_is_a_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        dk.token_entropy(torch.randn(2, 3), backend="numpy")


def test_available_backends_on_cpu_include_torch():
    assert "torch" in dk.available_backends(CPU)
    assert "cuda" not in dk.available_backends(CPU)


@pytest.mark.parametrize("bad, error, match", [
    (torch.tensor([0, 2, 5], dtype=torch.int64), TypeError, "int32"),
    (torch.tensor([1, 2, 5], dtype=torch.int32), ValueError, "start at 0"),
    (torch.tensor([0, 3, 2, 5], dtype=torch.int32), ValueError, "non-decreasing"),
    (torch.tensor([0, 2, 4], dtype=torch.int32), ValueError, "end at the total"),
    (torch.tensor([[0, 5]], dtype=torch.int32), ValueError, "1-D"),
    ([0, 5], TypeError, "torch.Tensor"),
])
def test_cu_seqlens_validation_names_the_argument(bad, error, match):
    with pytest.raises(error, match=match) as info:
        dk.patch_gather(torch.randn(5, 3), bad)
    assert "cu_tokens" in str(info.value)
