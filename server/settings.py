"""Server settings: the engine's options plus the server's own, one declaration for flags and env.

`ServerSettings` extends `megalodon_infer.config.EngineConfig`, so every engine option is a
`megalodon-serve` flag and a `MEGALODON_*` environment variable without a second copy; the fields
below are the server's own (network, auth, limits, timeouts). Flags win over environment
variables, which win over the defaults. Validation happens once, at start. Knows nothing of FastAPI
or uvicorn (`server.cli` turns the fields into flags) and imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from megalodon_infer.config import DEMO_MODEL_DIR, ENV_PREFIX, EngineConfig

DEMO_MODEL_NAME = "megalodon-demo"
__all__ = ["DEMO_MODEL_DIR", "DEMO_MODEL_NAME", "ENV_PREFIX", "ServerSettings"]


class ServerSettings(EngineConfig):
    """Everything `megalodon-serve` can be told. Each field is a flag (`--max-num-seqs`) and an
    environment variable (`MEGALODON_MAX_NUM_SEQS`)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    served_model_name: str | None = Field(
        None,
        description="Model name clients send and /v1/models lists. Defaults to 'megalodon-demo' for the demo "
        "model, else the model directory's name.",
    )
    host: str = Field("0.0.0.0", description="Address to listen on (all interfaces by default, as in containers).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    session_dir: Path | None = Field(
        None, description="Directory for named conversation states (POST /v1/sessions/save and /load); "
        "unset: sessions are off. Needs the prefix cache."
    )
    max_session_bytes: int = Field(
        1 << 30, ge=1024, description="Largest session file /v1/sessions/load reads, in bytes."
    )
    max_stored_responses: int = Field(
        1000, ge=0, description="Responses kept for previous_response_id and GET /v1/responses/{id} (store: true), "
        "least recently used dropped first; 0 stores none."
    )
    max_stored_response_bytes: int = Field(
        1 << 30, ge=0, description="Byte budget of the stored responses: their records (token history, messages) "
        "and, with --session-dir, their state files; least recently used dropped first."
    )
    api_key: str | None = Field(
        None,
        description="Require 'Authorization: Bearer <key>' on every route but /health, /version and /metrics. "
        "Several keys may be given, comma-separated.",
    )
    api_key_file: Path | None = Field(
        None, description="File holding API keys, one per line or comma-separated (e.g. a docker secret)."
    )
    admin_api_key: str | None = Field(
        None, description="A key that may also read and write every other key's sessions (named 'TENANT/NAME', "
        "TENANT from /v1/sessions/save's answer). Accepted wherever an API key is."
    )
    share_prefix_cache: bool = Field(
        False, description="Let requests of different API keys share cached states. Off: each key has a cache "
        "namespace of its own, so no key can learn of another's prompts through cached_tokens."
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="Log level.")
    access_log: bool = Field(True, description="Log one line per HTTP request (request id, status, tokens, latency).")
    drain_timeout: float = Field(
        30.0, ge=0, description="On SIGTERM, seconds to let in-flight requests finish before they are aborted."
    )
    keepalive_interval: float = Field(
        10.0, gt=0, description="Seconds between SSE keep-alive comments while a stream waits (queue, prefill)."
    )
    header_timeout: float = Field(
        10.0, gt=0, description="Seconds a client may take to send a request's headers; slower ones get 408 and "
        "the connection is closed.")
    body_timeout: float = Field(
        60.0, gt=0, description="Seconds a client may take to send a request's body; slower ones get 408.")
    max_request_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="Largest request body accepted; bigger ones get 413. The default "
        "takes a 1M-token prompt both as text and as token ids."
    )

    @model_validator(mode="after")
    def _check_server(self) -> ServerSettings:
        if self.api_key_file is not None and not self.api_key_file.is_file():
            raise ValueError(f"api_key_file {str(self.api_key_file)!r} is not a readable file")
        # NOTE: a key that is only blanks or separators would otherwise leave the server open while
        # the operator believes it is protected: refuse to start instead.
        if self.admin_api_key is not None and not self.admin_api_key.strip():
            raise ValueError("admin_api_key is blank: give a key, or leave it unset")
        if (self.api_key is not None or self.api_key_file is not None) and not self.api_keys():
            where = "api_key" if self.api_key is not None else f"api_key_file {str(self.api_key_file)!r}"
            raise ValueError(f"{where} holds no API key (only blanks or separators): give a key, or leave it unset "
                             "for a server without authentication")
        return self

    def engine_config(self) -> EngineConfig:
        """The engine's share of the settings."""
        return EngineConfig(**self.engine_fields())

    @property
    def model_name(self) -> str:
        """The name the model is served under."""
        if self.served_model_name:
            return self.served_model_name
        if self.model.resolve() == DEMO_MODEL_DIR:
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
