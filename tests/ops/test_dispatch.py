"""Backend selection and the shared validation every op relies on."""
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT

import dpar_kernels as dk
from dpar_kernels import _dispatch, _extension

CPU = torch.device("cpu")


def test_default_on_cpu_prefers_extension(default_backend):
    default_backend(None)
    expected = "cpu" if _extension.HAS_CPU_OPS else "torch"
    assert _dispatch.resolve_backend("op", None, CPU, dk.BACKENDS) == expected


def test_default_never_picks_triton_for_cpu_tensors(default_backend, monkeypatch):
    default_backend(None)
    monkeypatch.setattr(_dispatch, "TRITON_INTERPRETER", True)
    assert _dispatch.resolve_backend("op", None, CPU, ("torch", "triton")) == "torch"


def test_default_backend_can_be_set(default_backend):
    default_backend("torch")
    assert dk.default_backend() == "torch"
    assert _dispatch.resolve_backend("op", None, CPU, dk.BACKENDS) == "torch"
    assert dk.token_entropy(torch.randn(2, 3)).shape == (2,)
    default_backend(None)
    assert _dispatch.resolve_backend("op", None, CPU, ("torch",)) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        dk.set_default_backend("bogus")


@pytest.mark.parametrize("value, expected", [("torch", "'torch'"), ("", "None"), (None, "None")])
def test_environment_sets_default_at_import(value, expected):
    env = {k: v for k, v in os.environ.items() if k != "DPAR_BACKEND"} | ({} if value is None else
                                                                        {"DPAR_BACKEND": value})
    out = subprocess.run([sys.executable, "-c", "import dpar_kernels as dk; print(repr(dk.default_backend()))"],
                         env=env, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == expected


def test_environment_with_an_unknown_backend_fails_at_the_call():
    env = os.environ | {"DPAR_BACKEND": "bogus"}
    code = "import torch, dpar_kernels as dk; dk.token_entropy(torch.randn(2, 3))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "backend must be one of" in result.stderr


@pytest.mark.parametrize("value, expected", [("0", False), ("1", True)])
def test_environment_sets_validation_at_import(value, expected):
    env = os.environ | {"DPAR_VALIDATE": value}
    out = subprocess.run([sys.executable, "-c", "import dpar_kernels as dk; print(dk.validation_enabled())"],
                         env=env, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == str(expected)


def test_validation_can_be_set(validation):
    validation(False)
    assert not dk.validation_enabled()
    validation(True)
    assert dk.validation_enabled()
    with pytest.raises(TypeError, match="bool"):
        dk.set_validation("0")


def test_argument_overrides_default(default_backend):
    default_backend("cuda")
    assert _dispatch.resolve_backend("op", "torch", CPU, dk.BACKENDS) == "torch"


def test_forced_backend_that_cannot_run_raises(default_backend, monkeypatch):
    default_backend(None)
    with pytest.raises(dk.BackendUnavailableError, match="'cuda'.*CUDA tensors"):
        _dispatch.resolve_backend("op", "cuda", CPU, dk.BACKENDS)
    with pytest.raises(dk.BackendUnavailableError, match="not implemented"):
        _dispatch.resolve_backend("op", "triton", CPU, ("torch",))
    monkeypatch.setattr(_dispatch, "TRITON_INTERPRETER", False)
    with pytest.raises(dk.BackendUnavailableError, match="triton"):
        _dispatch.resolve_backend("op", "triton", CPU, dk.BACKENDS)


def test_resolution_cache_follows_the_availability_flags(default_backend, monkeypatch):
    """Cached results never outlive what they depend on (the extension flags, Triton, the default)."""
    default_backend(None)
    monkeypatch.setattr(_extension, "HAS_CPU_OPS", False)
    assert _dispatch.resolve_backend("op", None, CPU, dk.BACKENDS) == "torch"
    monkeypatch.setattr(_extension, "HAS_CPU_OPS", True)
    assert _dispatch.resolve_backend("op", None, CPU, dk.BACKENDS) == "cpu"
    default_backend("torch")
    assert _dispatch.resolve_backend("op", None, CPU, dk.BACKENDS) == "torch"


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
