"""megalodon_infer: exact, fast inference for Megalodon language models.

`from megalodon_infer import LLM, SamplingParams` is vLLM's import shape. The names below are
loaded on first use (PEP 562), so importing a light submodule such as `megalodon_infer.config`
(what `megalodon-serve --help` reads) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "ConfigError": "megalodon_infer.config",
    "EngineConfig": "megalodon_infer.config",
    "ModelConfig": "megalodon_infer.config",
    "SamplingParams": "megalodon_infer.sample.params",
    "CheckpointError": "megalodon_infer.model.loading",
    "load_model": "megalodon_infer.model.loading",
    "save_model": "megalodon_infer.model.loading",
    "Megalodon": "megalodon_infer.model.megalodon",
    "MegalodonState": "megalodon_infer.model.state",
    "request_state_bytes": "megalodon_infer.model.state",
    "slot_bytes": "megalodon_infer.model.state",
    "LLM": "megalodon_infer.engine.llm",
    "LLMEngine": "megalodon_infer.engine.llm_engine",
    "AsyncEngine": "megalodon_infer.engine.async_engine",
}

__all__ = [
    "AsyncEngine",
    "CheckpointError",
    "ConfigError",
    "EngineConfig",
    "LLM",
    "LLMEngine",
    "Megalodon",
    "MegalodonState",
    "ModelConfig",
    "SamplingParams",
    "load_model",
    "request_state_bytes",
    "save_model",
    "slot_bytes",
]

if TYPE_CHECKING:
    from megalodon_infer.config import ConfigError, EngineConfig, ModelConfig
    from megalodon_infer.engine.async_engine import AsyncEngine
    from megalodon_infer.engine.llm import LLM
    from megalodon_infer.engine.llm_engine import LLMEngine
    from megalodon_infer.model.loading import CheckpointError, load_model, save_model
    from megalodon_infer.model.megalodon import Megalodon
    from megalodon_infer.model.state import MegalodonState, request_state_bytes, slot_bytes
    from megalodon_infer.sample.params import SamplingParams


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'megalodon_infer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
