"""The extension build: required where DPAR_REQUIRE_EXTENSION=1 (scripts/test.sh, CI), so a failed build fails."""
import os

import pytest
import torch

from dpar_kernels import _extension

EXTENSION_OPS = ("token_entropy", "entropy_state_update", "patch_gather", "patch_gather_backward", "patch_scatter",
                 "varlen_attention", "varlen_attention_backward", "kvcache_attention")


def test_extension_built_where_required():
    if os.environ.get("DPAR_REQUIRE_EXTENSION") == "1":
        assert _extension.HAS_CPU_OPS, "dpar_kernels._C did not build; see the pip install output"
    if torch.cuda.is_available() and os.environ.get("DPAR_REQUIRE_EXTENSION") == "1":
        assert _extension.HAS_CUDA_OPS, "dpar_kernels._C was built without its CUDA kernels on a CUDA machine"


@pytest.mark.parametrize("name", EXTENSION_OPS)
def test_extension_registers_every_op(name):
    if not _extension.HAS_CPU_OPS:
        assert os.environ.get("DPAR_REQUIRE_EXTENSION") != "1"
        return
    assert hasattr(torch.ops.dpar_C, name)
