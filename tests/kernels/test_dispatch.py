"""Choosing the decode implementation: env override, loud fallback, dtype limits, csrc discovery."""

from __future__ import annotations

import logging

import pytest
import torch

from megalodon_infer import ModelConfig
from megalodon_infer.kernels import KERNELS_ENV, ExtensionBuildError, active_backend, build, dispatch
from megalodon_infer.model.init import random_model

CFG = ModelConfig(num_layers=1, model_dim=32, z_dim=16, value_dim=32, ffn_hidden_dim=48, cema_ndim=4,
                  norm_num_groups=4, vocab_size=61, chunk_size=8)


@pytest.fixture
def fresh_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget earlier choices so this test resolves again (restored afterwards)."""
    monkeypatch.setattr(dispatch, "_resolved", {})
    monkeypatch.setattr(dispatch, "_logged", set())


def test_env_var_forces_the_reference(monkeypatch, fresh_resolution):
    monkeypatch.setenv(KERNELS_ENV, "auto")
    model = random_model(CFG, dtype=torch.float32)
    assert model.decode_backend == "fused"
    monkeypatch.setenv(KERNELS_ENV, "reference")
    model.set_decode_kernels()
    assert model.decode_backend == "reference"
    assert active_backend("cpu") == "reference"
    monkeypatch.setenv(KERNELS_ENV, "auto")
    assert model.set_decode_kernels().name == "fused"


def test_unknown_mode_is_an_error(monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, "fastest")
    with pytest.raises(ValueError, match="MEGALODON_KERNELS"):
        active_backend("cpu")


def test_broken_build_falls_back_loudly_or_raises_when_fused_is_required(monkeypatch, fresh_resolution, caplog):
    def broken(device_type: str) -> str:
        raise ExtensionBuildError("simulated compiler error: no such header")

    monkeypatch.setattr(dispatch, "_load_extension", broken)
    with caplog.at_level(logging.INFO, logger="megalodon_infer.kernels"):
        kernels = dispatch.resolve_device_kernels("cpu", "auto")
    assert kernels.name == "reference" and "simulated compiler error" in kernels.reason
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and "simulated compiler error" in errors[0].getMessage()
    with pytest.raises(ExtensionBuildError, match="simulated"):
        dispatch.resolve_device_kernels("cpu", "fused")


def test_float64_models_use_the_reference():
    model = random_model(CFG, dtype=torch.float64)
    assert model.decode_backend == "reference"
    with pytest.raises(ValueError, match="fused kernels implement"):
        model.set_decode_kernels("fused")


def test_a_dtype_move_resolves_again():
    model = random_model(CFG, dtype=torch.float32)
    assert model.set_decode_kernels("auto").name == "fused"
    model.double()
    assert model.decode_backend == "reference"


def test_csrc_is_found_with_every_source():
    root = build.csrc_dir()
    for source in (*build.CPU_SOURCES, *build.CUDA_SOURCES):
        assert (root / source).is_file(), source
