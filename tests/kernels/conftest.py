"""Devices the kernel tests run on: the CPU always, CUDA (marked gpu) where a GPU is present."""

from __future__ import annotations

import pytest
import torch

from megalodon_infer.kernels import load_cpu_extension, load_cuda_extension

NO_CUDA = "needs a CUDA device; scripts/gpu_check.sh runs these on the GPU machine"

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]),
]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """A device whose fused extension is loaded; a failed build fails the test (no fallback here)."""
    load_cpu_extension()
    if request.param == "cuda":
        load_cuda_extension()
    return request.param


@pytest.fixture
def cpu_extension() -> None:
    """The CPU extension, loaded (a failed build fails the test)."""
    load_cpu_extension()
