"""The two configurations: the model's shape (`ModelConfig`) and how the engine runs it (`EngineConfig`).

`ModelConfig` holds the official `ModelConf` field names and defaults, read from an official
`config.json` (its `model` section) or ours, and rejects inconsistent values with a message naming
the field. `EngineConfig` is the one declaration of every engine option: each field is a keyword of
`LLM(...)`/`LLMEngine.from_config`, a `MEGALODON_*` environment variable (pydantic-settings) and,
through `server.settings`, a `megalodon-serve` flag. Nothing here imports torch, so reading the
configuration (and `megalodon-serve --help`) stays fast.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "MEGALODON_"
# The bundled demo model (package data): what the server and `LLM()` run when given no model.
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"
KERNEL_MODES = ("auto", "reference", "fused")
# Positions are int64: without a cap, this is the longest context a request can reach (what the
# server reports as max_model_len to clients that budget prompts by it).
MAX_POSITION = 2**63 - 1

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


class EngineConfig(BaseSettings):
    """How the engine loads, schedules and sizes a model. Validated once, frozen afterwards.

    Every field is also read from `MEGALODON_<FIELD>` (explicit keywords win), so a deployment can
    set any of them from the environment; `megalodon-serve` adds a flag per field.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    model: Path = Field(
        DEMO_MODEL_DIR,
        description="Model directory: config.json + weights (model.safetensors or official consolidated*.pth), "
        "optionally tokenizer.model. Defaults to the bundled demo model.")
    dtype: Literal["float32", "bfloat16", "float64"] = Field(
        "float32", description="Weight and KV dtype; the recurrent state stays fp32/complex64.")
    device: str = Field("cpu", description="Torch device to run the model on (cpu, cuda, cuda:1, ...).")
    kernels: Literal["auto", "reference", "fused"] = Field(
        "auto", description="Decode kernels: 'auto' uses the fused C++/CUDA ops when they build and load (else the "
        "torch reference, logged), 'fused' makes a failed build an error, 'reference' forces the torch twins.")
    cuda_graphs: bool = Field(
        True, description="On a CUDA device with fused kernels, replay decode steps from CUDA graphs.")
    max_num_seqs: int = Field(16, ge=1, description="State slots: sequences decoding at once (n counts each).")
    max_num_batched_tokens: int = Field(
        2048, ge=1, description="Tokens per engine step: one per decoding sequence, the rest spent on prefill.")
    max_waiting_requests: int = Field(
        256, ge=0, description="Sequences allowed to wait for a slot; beyond it requests are refused as overloaded "
        "(HTTP 429 with Retry-After).")
    max_model_len: int | None = Field(
        None, ge=0, description="Optional cap on prompt + completion tokens (0 or unset: no cap). A request's memory "
        "does not grow with its context and positions are 64-bit, so by default any length is served.")
    default_max_tokens: int | None = Field(
        65536, ge=0, description="Output tokens a request that leaves max_tokens open may generate (it stops earlier "
        "at EOS or a stop condition, and never beyond --max-model-len); 0: no limit.")
    state_memory_limit_bytes: int | None = Field(
        None, ge=1, description="Refuse to start if the state slots would need more bytes than this.")
    prefix_cache_bytes: int | None = Field(
        None, ge=0, description="Device-memory budget of the recurrent-state prefix cache, in bytes; 0 turns the "
        "cache off. Unset: sized from the memory free after the weights and state slots are allocated (25% on "
        "the device; see docs/serving.md), logged at start.")
    prefix_cache_host_bytes: int | None = Field(
        None, ge=0, description="Host-memory tier of the prefix cache: snapshots evicted from the device go here "
        "first. Unset: 25% of the available host memory when the model is on a GPU, none on the CPU (the device "
        "tier is host memory already).")
    state_store_dir: Path | None = Field(
        None, description="Folder shared by every replica of a model (a shared volume across machines): each "
        "finished request's final state is written there in the session format, and a replica given a prompt it "
        "holds no long prefix of resumes from it instead of prefilling. Unset: off. Needs the prefix cache.")
    state_store_bytes: int = Field(
        8 << 30, ge=1 << 20, description="Byte budget of --state-store-dir; the least recently used states are "
        "deleted beyond it.")
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads torch may use. Unset: one less than the CPUs this process may use "
        "(its affinity and cgroup CPU quota), at least one, so the server's own threads and a busy neighbour "
        "never stall torch's parallel regions.")

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        # 0 spells "no limit" on a command line; keep one spelling inside
        if self.max_model_len == 0:
            object.__setattr__(self, "max_model_len", None)
        if self.default_max_tokens == 0:
            object.__setattr__(self, "default_max_tokens", None)
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2 (or 0 for no cap), got {self.max_model_len}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # every running sequence decodes each step; prefill needs room left over
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs})")
        return self

    def engine_fields(self) -> dict[str, Any]:
        """This configuration's engine options as keywords (a subclass's extra fields left out)."""
        return {name: getattr(self, name) for name in EngineConfig.model_fields}
