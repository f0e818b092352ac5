"""Choosing the decode implementation: explicit mode, loud fallback, dtype limits, csrc discovery."""

from __future__ import annotations

import logging

import pytest
import torch

from megalodon_infer import ModelConfig
from megalodon_infer.kernels import ExtensionBuildError, active_backend, build, dispatch
from megalodon_infer.model.init import random_model
from megalodon_infer.worker.decode_ops import build_decode_ops
from megalodon_infer.worker.model_runner import ModelRunner

CFG = ModelConfig(num_layers=1, model_dim=32, z_dim=16, value_dim=32, ffn_hidden_dim=48, cema_ndim=4,
                  norm_num_groups=4, vocab_size=61, chunk_size=8)


@pytest.fixture
def fresh_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget earlier choices so this test resolves again (restored afterwards)."""
    monkeypatch.setattr(dispatch, "_resolved", {})
    monkeypatch.setattr(dispatch, "_logged", set())


def test_the_mode_passed_in_chooses(fresh_resolution):
    model = random_model(CFG, dtype=torch.float32)
    state = model.allocate_state(2)
    assert ModelRunner(model, state).decode_backend == "fused"  # "auto" by default
    assert ModelRunner(model, state, kernels="reference").decode_backend == "reference"
    assert active_backend("cpu", "reference") == "reference"
    assert ModelRunner(model, state, kernels="auto").decode_backend == "fused"
    assert build_decode_ops(model, mode="fused").is_fused


def test_the_environment_is_not_read(monkeypatch, fresh_resolution):
    """$MEGALODON_KERNELS is EngineConfig's (pydantic-settings); kernels/ takes the mode it is given."""
    monkeypatch.setenv("MEGALODON_KERNELS", "reference")
    model = random_model(CFG, dtype=torch.float32)
    assert build_decode_ops(model, mode="auto").name == "fused"
    assert active_backend("cpu") == "fused"


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="kernels mode"):
        active_backend("cpu", "fastest")
    with pytest.raises(ValueError, match="kernels mode"):
        build_decode_ops(random_model(CFG), mode="fastest")


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
    assert build_decode_ops(model, mode="auto").name == "reference"
    with pytest.raises(ValueError, match="fused kernels implement"):
        build_decode_ops(model, mode="fused")


def test_a_dtype_move_resolves_again():
    """The model caches no choice: ops built after a dtype move see the new dtype."""
    model = random_model(CFG, dtype=torch.float32)
    assert build_decode_ops(model, mode="auto").name == "fused"
    model.double()
    assert build_decode_ops(model, mode="auto").name == "reference"


def test_csrc_is_found_with_every_source():
    root = build.csrc_dir()
    for source in (*build.CPU_SOURCES, *build.CUDA_SOURCES):
        assert (root / source).is_file(), source
