"""A Responses API answer: output items built from the generated text, as a stream of typed events or
as one response object.

Owns the Responses event order: `response.created`, `response.in_progress`, then per output item
`response.output_item.added`, its content (`response.content_part.added`,
`response.output_text.delta`..., `response.output_text.done`, `response.content_part.done`, or
`response.function_call_arguments.delta`..., `response.function_call_arguments.done`),
`response.output_item.done`, and last `response.completed` (or `response.incomplete` when the
output limit cut it). Each event is `event: <type>` + `data: <json>` with a `sequence_number`; a
failure after the stream started is an `error` event. Text becomes items through the tool-call
parser (`server.tool_parser`), so the streamed and the whole answer are the same items.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from megalodon_infer.engine.outputs import RequestOutput
from server.errors import to_openai_error
from server.generation import KEEPALIVE, Generation
from server.protocol_responses import (
    FunctionCallItem,
    IncompleteDetails,
    InputTokensDetails,
    OutputMessage,
    OutputText,
    ResponseObject,
    ResponseUsage,
)
from server.sse import SSE_KEEPALIVE, SSE_MEDIA_TYPE, sse_headers
from server.tool_parser import CallDelta, ParseDelta, ToolCallParser

logger = logging.getLogger("megalodon.server")

Event = dict[str, Any]


class ResponsesAssembler:
    """One response's output items, built from its engine outputs (one choice)."""

    def __init__(self, response: ResponseObject, prompt_ids: list[int], parse_tools: bool,
                 max_calls: int | None, return_token_ids: bool = False) -> None:
        self.response = response
        self.prompt_ids = prompt_ids
        self.num_prompt_tokens = len(prompt_ids)
        self.return_token_ids = return_token_ids
        self.parser = ToolCallParser(max_calls) if parse_tools else None
        self.output_ids: list[int] = []
        self.num_cached_tokens = 0
        self.finish_reason: str | None = None
        self._sequence = 0
        self._open: OutputMessage | FunctionCallItem | None = None
        self._calls: dict[int, FunctionCallItem] = {}  # parser call index -> its item

    # ------------------------------------------------------------------------------- events
    def start_events(self) -> list[Event]:
        snapshot = self.response.model_dump(mode="json")
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def events(self, output: RequestOutput) -> list[Event]:
        """The events one (merged) engine output makes."""
        self.num_cached_tokens = output.num_cached_tokens
        events: list[Event] = []
        for delta in output.outputs:
            self.output_ids += delta.token_ids
            parsed = self.parser.push(delta.text) if self.parser is not None else ParseDelta(content=delta.text)
            if delta.finish_reason is not None:
                self.finish_reason = delta.finish_reason
                if self.parser is not None:
                    parsed.extend(self.parser.finish())
            if parsed.content:
                events += self._text(parsed.content)
            for call in parsed.calls:
                events += self._call(call)
        if output.finished:
            events += self._close()
            self._finalize()
            kind = "response.completed" if self.response.status == "completed" else "response.incomplete"
            events.append(self._event(kind, response=self.response.model_dump(mode="json")))
        return events

    def error_event(self, exc: BaseException) -> Event:
        error = to_openai_error(exc)
        return self._event("error", code=str(error.code), message=error.message, param=error.param)

    def response_of(self, finals: list[RequestOutput]) -> ResponseObject:
        """The whole response from the complete output (non-streaming)."""
        self.events(finals[0])
        return self.response

    # ------------------------------------------------------------------------------ items
    def _text(self, text: str) -> list[Event]:
        events: list[Event] = []
        item = self._open
        if not isinstance(item, OutputMessage):
            events += self._close()
            item = OutputMessage(id=f"msg_{uuid.uuid4().hex}")
            events += self._add(item)
            item.content.append(OutputText())
            events.append(self._event("response.content_part.added", item_id=item.id,
                                      output_index=self._index(item), content_index=0,
                                      part=OutputText().model_dump(mode="json")))
        item.content[0].text += text
        events.append(self._event("response.output_text.delta", item_id=item.id, output_index=self._index(item),
                                  content_index=0, delta=text, logprobs=[]))
        return events

    def _call(self, call: CallDelta) -> list[Event]:
        events: list[Event] = []
        if call.id is not None:  # a new call begins
            events += self._close()
            item = FunctionCallItem(id=f"fc_{uuid.uuid4().hex}", call_id=call.id, name=call.name or "")
            self._calls[call.index] = item
            events += self._add(item)
        item = self._calls[call.index]
        if call.arguments:
            item.arguments += call.arguments
            events.append(self._event("response.function_call_arguments.delta", item_id=item.id,
                                      output_index=self._index(item), delta=call.arguments))
        return events

    def _add(self, item: OutputMessage | FunctionCallItem) -> list[Event]:
        self.response.output.append(item)
        self._open = item
        return [self._event("response.output_item.added", output_index=self._index(item),
                            item=item.model_dump(mode="json"))]

    def _close(self) -> list[Event]:
        """The done events of the open item."""
        item, self._open = self._open, None
        if item is None:
            return []
        item.status = "incomplete" if self.finish_reason == "length" else "completed"
        index = self._index(item)
        if isinstance(item, OutputMessage):
            part = item.content[0]
            events = [self._event("response.output_text.done", item_id=item.id, output_index=index, content_index=0,
                                  text=part.text, logprobs=[]),
                      self._event("response.content_part.done", item_id=item.id, output_index=index,
                                  content_index=0, part=part.model_dump(mode="json"))]
        else:
            events = [self._event("response.function_call_arguments.done", item_id=item.id, output_index=index,
                                  name=item.name, arguments=item.arguments)]
        return events + [self._event("response.output_item.done", output_index=index,
                                     item=item.model_dump(mode="json"))]

    def _finalize(self) -> None:
        response = self.response
        if self.finish_reason == "length":
            response.status, response.incomplete_details = "incomplete", IncompleteDetails(reason="max_output_tokens")
        else:
            response.status = "completed"
        for item in response.output:  # items closed before the finish was known
            if item.status == "in_progress":
                item.status = "completed"
        response.usage = ResponseUsage(
            input_tokens=self.num_prompt_tokens, output_tokens=len(self.output_ids),
            total_tokens=self.num_prompt_tokens + len(self.output_ids),
            input_tokens_details=InputTokensDetails(cached_tokens=self.num_cached_tokens))
        if self.return_token_ids:
            response.prompt_token_ids, response.output_token_ids = self.prompt_ids, self.output_ids

    def _index(self, item: OutputMessage | FunctionCallItem) -> int:
        return next(i for i, other in enumerate(self.response.output) if other is item)

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    # ------------------------------------------------------------------------------ answer
    @property
    def content(self) -> str:
        return "".join(item.content[0].text for item in self.response.output
                       if isinstance(item, OutputMessage) and item.content)

    def reply_message(self) -> dict[str, Any]:
        """The assistant message this response adds to the conversation (as the template reads it)."""
        calls = [{"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
                 for item in self.response.output if isinstance(item, FunctionCallItem)]
        message: dict[str, Any] = {"role": "assistant", "content": self.content or (None if calls else "")}
        if calls:
            message["tool_calls"] = calls
        return message


def sse_typed_event(event: Event) -> bytes:
    """`event: <type>` then the JSON on `data:` lines (JSON text holds no raw newline)."""
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


def stream_response(request: Request, generation: Generation, assembler: ResponsesAssembler, keepalive_s: float,
                    on_finished: Callable[[], None]) -> StreamingResponse:
    """The SSE answer of a started generation; `on_finished` runs once the response is complete, before
    its last events are sent."""

    async def close_generation() -> None:
        generation.close(client_left=True)

    return StreamingResponse(_events(generation, assembler, keepalive_s, on_finished), media_type=SSE_MEDIA_TYPE,
                             headers=sse_headers(), background=BackgroundTask(close_generation))


async def _events(generation: Generation, assembler: ResponsesAssembler, keepalive_s: float,
                  on_finished: Callable[[], None]) -> AsyncIterator[bytes]:
    try:
        for event in assembler.start_events():
            yield sse_typed_event(event)
        async for batch in generation.events(keepalive_s):
            if batch is KEEPALIVE:
                yield SSE_KEEPALIVE
                continue
            for _, output in batch:
                events = assembler.events(output)
                if output.finished:
                    on_finished()  # stored before the client can read `response.completed` and continue
                for event in events:
                    yield sse_typed_event(event)
    except Exception as exc:
        generation.close()
        logger.warning("response stream failed after it started: %s", exc, exc_info=not hasattr(exc, "status"))
        yield sse_typed_event(assembler.error_event(exc))
    finally:
        generation.close(client_left=True)
