"""Wire request -> engine `SamplingParams`: the one place the two vocabularies meet.

Owns the mapping of OpenAI/vLLM request fields onto `megalodon_infer.sampling_params.SamplingParams`
(defaults, aliases, chat vs completions differences). Knows nothing of HTTP responses; bad values
raise `ValueError` naming the field, which `server.errors` turns into a 400.
"""

from dataclasses import fields
from typing import Any

from megalodon_infer.sample.params import SamplingParams, StructuredOutputsParams
from server.errors import InvalidParameterError
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.structured import constraint_of

# Request fields that map one-to-one onto SamplingParams fields of the same name. Left out (None)
# means "SamplingParams' own default", so the engine stays the single source of defaults.
_PASSTHROUGH = (
    "n",
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
    "ignore_eos",
    "min_tokens",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "prompt_logprobs",
)
_SAMPLING_FIELDS = frozenset(f.name for f in fields(SamplingParams))


def to_sampling_params(req: CompletionRequest | ChatCompletionRequest,
                       tool_constraint: StructuredOutputsParams | None = None) -> SamplingParams:
    """Build the engine's sampling settings for one request.

    An output length left open (completions `max_tokens: null`; chat with neither `max_tokens` nor
    `max_completion_tokens`) stays None: the engine gives it the room the context leaves, as vLLM does.
    The structured-outputs constraint is what the request's `response_format` or `structured_outputs`
    asks for, unless chat forces tool calls (`tool_constraint`, its tool plan's grammar).

    Raises `ValueError` (an `InvalidParameterError` carrying `.param`) for a bad value.
    """
    kwargs: dict[str, Any] = {name: getattr(req, name) for name in _PASSTHROUGH}
    kwargs = {name: value for name, value in kwargs.items() if value is not None}
    kwargs["top_k"] = _top_k(req.top_k)
    kwargs["stop"] = _stop(req.stop)
    kwargs["stop_token_ids"] = list(req.stop_token_ids or [])
    kwargs["logit_bias"] = _logit_bias(req.logit_bias)
    kwargs["structured_outputs"] = tool_constraint or constraint_of(req.response_format, req.structured_outputs)

    if isinstance(req, ChatCompletionRequest):
        max_tokens_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        kwargs["max_tokens"] = _first_given(req.max_completion_tokens, req.max_tokens)
        # Chat's `logprobs` is a switch and `top_logprobs` the count; the engine only wants the count.
        kwargs["logprobs"] = (req.top_logprobs or 0) if req.logprobs else None
    else:
        max_tokens_param = "max_tokens"
        kwargs["max_tokens"] = req.max_tokens
        kwargs["logprobs"] = req.logprobs
        # `echo` with `logprobs` scores the prompt too (lm-eval loglikelihood): the same top-k count
        # is asked for on every prompt position.
        if req.echo and req.logprobs is not None and req.prompt_logprobs is None:
            kwargs["prompt_logprobs"] = req.logprobs

    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise InvalidParameterError(str(exc), param=_param_of(str(exc), max_tokens_param)) from exc


def _first_given(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


def _top_k(value: int | None) -> int:
    # Clients use both 0 and -1 for "no top-k" (vLLM accepts either); SamplingParams only knows -1.
    if value is None or value == 0:
        return -1
    return value


def _stop(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def _logit_bias(value: dict[str, float] | None) -> dict[int, float]:
    # JSON object keys are strings; OpenAI defines them as token ids written in decimal.
    result: dict[int, float] = {}
    for key, bias in (value or {}).items():
        try:
            token_id = int(key)
        except ValueError:
            raise InvalidParameterError(
                f"logit_bias keys must be token ids written as integers, got {key!r}.", param="logit_bias"
            ) from None
        if token_id < 0:
            raise InvalidParameterError(
                f"logit_bias keys must be non-negative token ids, got {key!r}.", param="logit_bias"
            )
        result[token_id] = bias
    return result


def _param_of(message: str, max_tokens_param: str) -> str | None:
    # SamplingParams messages start with the field's name ("temperature must be ..."); report it
    # under the wire name the client actually used.
    first = message.split(" ", 1)[0]
    if first not in _SAMPLING_FIELDS:
        return None
    if first == "max_tokens":
        return max_tokens_param
    return first
