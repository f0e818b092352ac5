"""Per-request generation settings, in vLLM's shape.

Owns validation of user-facing sampling knobs (a `ValueError` naming the field). Knows nothing of
tensors, HTTP or the scheduler; the server converts its wire types into this, the engine reads it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

# Logprob requests above this are refused: the OpenAI API caps top_logprobs at 20.
MAX_LOGPROBS = 20
# NaN passes every range check written as comparisons: test these for finiteness first.
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A constraint on the text a request may generate (vLLM's `structured_outputs`): exactly one of

    - `json`: a JSON schema (a dict, or its JSON text); the output is one JSON value it validates;
    - `json_object`: any JSON object;
    - `regex`: the whole output matches this regular expression (Rust `regex` syntax);
    - `choice`: the output is exactly one of these strings;
    - `grammar`: a context-free grammar, in llguidance's Lark dialect or in GBNF (llama.cpp's).

    `lenient` (JSON schemas): keywords the grammar engine does not implement are ignored instead of
    refusing the schema (OpenAI's non-strict mode). A schema is kept as its JSON text, key order
    included (the order properties are generated in), so equal constraints share one compiled grammar.
    """

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    lenient: bool = False

    def __post_init__(self) -> None:
        if self.json is not None:
            schema = _parse_schema(self.json) if isinstance(self.json, str) else self.json
            object.__setattr__(self, "json", _schema_text(schema))
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings.")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string.")
        given = [name for name in ("json", "json_object", "regex", "choice", "grammar") if getattr(self, name)]
        if len(given) != 1:
            raise ValueError("structured_outputs takes exactly one of json, json_object, regex, choice and grammar, "
                             f"got {given or 'none'}.")

    @property
    def kind(self) -> str:
        return next(name for name in ("json", "json_object", "regex", "choice", "grammar") if getattr(self, name))


def _parse_schema(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None


def _schema_text(schema: object) -> str:
    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be a JSON object, got {type(schema).__name__}.")
    try:
        return json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the JSON schema cannot be written as JSON: {exc}") from None


@dataclass
class SamplingParams:
    """How to pick the tokens of one request.

    temperature 0 means greedy. `stop` strings are matched on the detokenized text across token
    boundaries and are cut from the output unless `include_stop_str_in_output`. `seed` makes the
    draws of this request reproducible whatever else shares its batch. `logprobs=k` returns the
    chosen token's logprob and the top k alternatives for every generated token; `prompt_logprobs=k`
    does the same for the prompt tokens (for `echo`). `structured_outputs` constrains the text to a
    JSON schema, regex, choice or grammar (the engine compiles it at admission; a bad one is a
    ValueError there).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    max_tokens: int | None = 16
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self.validate()

    def validate(self) -> None:
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}.")
        if any(not math.isfinite(bias) for bias in self.logit_bias.values()):
            raise ValueError("logit_bias values must be finite numbers.")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disable) or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}.")
        for token_id, bias in self.logit_bias.items():
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias for token {token_id} must be in [-100, 100], got {bias}.")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise ValueError(f"max_tokens must be non-negative, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be non-negative, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be less than or equal to max_tokens ({self.max_tokens})."
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}.")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty.")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0
