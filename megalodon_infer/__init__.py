"""megalodon_infer: exact, fast inference for Megalodon language models."""

from .config import ConfigError, ModelConfig
from .loading import CheckpointError, load_model, save_model
from .model import Megalodon, MegalodonState, request_state_bytes, slot_bytes
from .sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Megalodon",
    "MegalodonState",
    "ModelConfig",
    "SamplingParams",
    "load_model",
    "request_state_bytes",
    "save_model",
    "slot_bytes",
]
