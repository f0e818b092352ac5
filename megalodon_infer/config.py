"""Model configuration with the official `ModelConf` field names and defaults.

Owns reading a model's shape from an official `config.json` (its `model` section) or from our own
`config.json`, and rejecting inconsistent values with a message that names the field. Knows nothing
of weights, devices or requests.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

# Fields the official trainer writes that do nothing at inference; accepted and ignored.
_TRAINING_ONLY_FIELDS = frozenset({"custom_bwd", "loss_parallel"})


class ConfigError(ValueError):
    """A model configuration that cannot describe a valid Megalodon."""


class ModelConfig(BaseModel):
    """Megalodon hyper-parameters, named as in the official `megalodon/config.py` `ModelConf`.

    Symbols used in shape docstrings elsewhere: D=model_dim, Z=z_dim, E=value_dim, H=num_heads,
    F=ffn_hidden_dim, N=cema_ndim, G=norm_num_groups, C=chunk_size, V=vocab_size.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_layers: int = 8
    model_dim: int = 1024
    z_dim: int = 256
    value_dim: int = 2048
    num_heads: int = 1
    ffn_hidden_dim: int = 2048
    cema_ndim: int = 16
    chunk_size: int = 2048
    efficient_attn: str | None = None
    init_mode: str = "he"
    vocab_size: int = -1
    output_size: int = -1
    norm_num_groups: int = 32
    norm_affine: bool = True
    norm_eps: float = 1e-5
    rope_base: float | None = None
    dropout: float = 0.0
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    swiglu: bool = False
    rescale_nffn: bool = False
    scale_emb: bool = False
    share_emb: bool = False
    layerwise_ckpt: bool = False

    @model_validator(mode="after")
    def _check_consistency(self) -> ModelConfig:
        positive = ("num_layers", "model_dim", "z_dim", "value_dim", "num_heads", "ffn_hidden_dim",
                    "cema_ndim", "chunk_size", "norm_num_groups", "vocab_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.z_dim % self.num_heads:
            raise ValueError(f"z_dim ({self.z_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.value_dim % self.num_heads:
            raise ValueError(f"value_dim ({self.value_dim}) must be divisible by num_heads ({self.num_heads})")
        if (self.z_dim // self.num_heads) % 2:
            raise ValueError(f"z_dim / num_heads ({self.z_dim // self.num_heads}) must be even for RoPE")
        if self.model_dim % self.norm_num_groups:
            raise ValueError(
                f"norm_num_groups ({self.norm_num_groups}) must divide model_dim ({self.model_dim})"
            )
        if self.output_size == 0 or self.output_size < -1:
            raise ValueError(f"output_size must be -1 or positive, got {self.output_size}")
        if self.share_emb and self.output_size not in (-1, self.vocab_size):
            raise ValueError(f"share_emb needs output_size == vocab_size, got output_size={self.output_size}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        if self.rope_base is not None and self.rope_base <= 0:
            raise ValueError(f"rope_base must be positive, got {self.rope_base}")
        if self.efficient_attn not in (None, "swift", "fused"):
            raise ValueError(f"efficient_attn must be null, 'swift' or 'fused', got {self.efficient_attn!r}")
        return self

    # Derived sizes, named as in the spec's notation table.
    @property
    def head_z_dim(self) -> int:
        return self.z_dim // self.num_heads

    @property
    def head_value_dim(self) -> int:
        return self.value_dim // self.num_heads

    @property
    def group_size(self) -> int:
        return self.model_dim // self.norm_num_groups

    @property
    def effective_output_size(self) -> int:
        return self.vocab_size if self.output_size == -1 else self.output_size

    @property
    def effective_rope_base(self) -> float:
        return 10000.0 if self.rope_base is None else float(self.rope_base)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> ModelConfig:
        """Build from a dict of `ModelConf` fields; raises ConfigError naming the bad field."""
        fields = {k: v for k, v in fields.items() if k not in _TRAINING_ONLY_FIELDS}
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise ConfigError(_describe_validation_error(exc)) from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        """Read our `config.json` or an official one (whose `model` section holds the fields)."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read model config {path}: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        fields = raw.get("model", raw)
        if not isinstance(fields, dict):
            raise ConfigError(f"{path}: the 'model' section must be a JSON object")
        return cls.from_dict(fields)

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def fingerprint(self) -> str:
        """A stable hash of the shape-defining fields (for snapshot metadata)."""
        blob = json.dumps(self.model_dump(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown config field '{loc}'")
        elif loc:
            parts.append(f"config field '{loc}': {err['msg']}")
        else:
            parts.append(f"invalid config: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)
