"""Server settings: one declaration read from CLI flags and `MEGALODON_*` environment variables.

Owns every knob of `megalodon-serve` (model, network, engine sizing, auth, limits, timeouts) and
its validation, done once at start. Flags win over environment variables, which win over the
defaults. Knows nothing of FastAPI or uvicorn; `server.cli` turns the fields into flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from megalodon_infer.demo import DEMO_MODEL_DIR
from megalodon_infer.engine_config import EngineConfig

ENV_PREFIX = "MEGALODON_"
DEMO_MODEL_NAME = "megalodon-demo"

_ENGINE_DEFAULTS = EngineConfig()


def demo_model_dir() -> Path:
    """Where the bundled demo model lives (`megalodon_infer/demo_model/`), trained or not."""
    return DEMO_MODEL_DIR


class ServerSettings(BaseSettings):
    """Everything `megalodon-serve` can be told. Each field is a flag (`--max-num-seqs`) and an
    environment variable (`MEGALODON_MAX_NUM_SEQS`)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    model: Path = Field(
        default_factory=demo_model_dir,
        description="Model directory: config.json + weights (model.safetensors or official consolidated*.pth), "
        "optionally tokenizer.model. Defaults to the bundled demo model.",
    )
    served_model_name: str | None = Field(
        None,
        description="Model name clients send and /v1/models lists. Defaults to 'megalodon-demo' for the demo "
        "model, else the model directory's name.",
    )
    host: str = Field("0.0.0.0", description="Address to listen on (all interfaces by default, as in containers).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    dtype: Literal["float32", "bfloat16", "float64"] = Field(
        "float32", description="Weight and KV dtype; the recurrent state stays fp32/complex64."
    )
    device: str = Field("cpu", description="Torch device to run the model on (cpu, cuda, cuda:1, ...).")
    max_num_seqs: int = Field(
        _ENGINE_DEFAULTS.max_num_seqs, ge=1, description="State slots: sequences decoding at once (n counts each)."
    )
    max_num_batched_tokens: int = Field(
        _ENGINE_DEFAULTS.max_num_batched_tokens, ge=1, description="Token budget of one engine step."
    )
    max_waiting_requests: int = Field(
        _ENGINE_DEFAULTS.max_waiting_requests,
        ge=0,
        description="Sequences allowed to wait for a slot; beyond it requests get 429 with Retry-After.",
    )
    max_model_len: int = Field(
        _ENGINE_DEFAULTS.max_model_len, ge=2, description="Longest prompt + completion accepted, in tokens."
    )
    state_memory_limit_bytes: int | None = Field(
        None, ge=1, description="Refuse to start if the state slots would need more bytes than this."
    )
    prefix_cache_bytes: int = Field(
        _ENGINE_DEFAULTS.prefix_cache_bytes,
        ge=0,
        description="Device-memory budget of the recurrent-state prefix cache, in bytes (0: off).",
    )
    prefix_cache_host_bytes: int = Field(
        _ENGINE_DEFAULTS.prefix_cache_host_bytes,
        ge=0,
        description="Host-memory tier of the prefix cache: snapshots evicted from the device go here first.",
    )
    session_dir: Path | None = Field(
        None, description="Directory for named conversation states (POST /v1/sessions/save and /load); "
        "unset: sessions are off. Needs the prefix cache."
    )
    max_session_bytes: int = Field(
        1 << 30, ge=1024, description="Largest session file /v1/sessions/load reads, in bytes."
    )
    api_key: str | None = Field(
        None,
        description="Require 'Authorization: Bearer <key>' on every route but /health, /version and /metrics. "
        "Several keys may be given, comma-separated.",
    )
    api_key_file: Path | None = Field(
        None, description="File holding API keys, one per line or comma-separated (e.g. a docker secret)."
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="Log level.")
    access_log: bool = Field(True, description="Log one line per HTTP request (request id, status, tokens, latency).")
    drain_timeout: float = Field(
        30.0, ge=0, description="On SIGTERM, seconds to let in-flight requests finish before they are aborted."
    )
    keepalive_interval: float = Field(
        10.0, gt=0, description="Seconds between SSE keep-alive comments while a stream waits (queue, prefill)."
    )
    max_request_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest request body accepted; bigger ones get 413."
    )
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads torch may use (default: torch's own choice)."
    )

    @model_validator(mode="after")
    def _check(self) -> ServerSettings:
        self.engine_config()  # cross-field engine checks, with the engine's own messages
        if self.api_key_file is not None and not self.api_key_file.is_file():
            raise ValueError(f"api_key_file {str(self.api_key_file)!r} is not a readable file")
        return self

    def engine_config(self) -> EngineConfig:
        """The engine's share of the settings."""
        return EngineConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_waiting_requests=self.max_waiting_requests,
            max_model_len=self.max_model_len,
            state_memory_limit_bytes=self.state_memory_limit_bytes,
            prefix_cache_bytes=self.prefix_cache_bytes,
            prefix_cache_host_bytes=self.prefix_cache_host_bytes,
        )

    @property
    def model_name(self) -> str:
        """The name the model is served under."""
        if self.served_model_name:
            return self.served_model_name
        if self.model.resolve() == demo_model_dir():
            return DEMO_MODEL_NAME
        return self.model.resolve().name

    def api_keys(self) -> list[str]:
        """Every accepted API key (empty: no auth)."""
        sources = [self.api_key or ""]
        if self.api_key_file is not None:
            sources.append(self.api_key_file.read_text(encoding="utf-8"))
        keys = []
        for source in sources:
            for line in source.splitlines():
                keys.extend(key.strip() for key in line.split(","))
        return [key for key in keys if key]
