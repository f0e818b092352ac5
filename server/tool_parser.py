"""Reading tool calls out of generated text, incrementally: content deltas and tool-call deltas.

Owns the parse of the chat template's tool-call format (`<tool_call>\\n{"name": ..., "arguments":
{...}}\\n</tool_call>` blocks; see `megalodon_infer.tokenization.chat_template`). Text arrives in
pieces; each `push` returns what can be told for sure: content outside the blocks (text that might
still begin a block is held back), a call's header (id and name) as soon as its name is read, then
its `arguments` as they stream, character for character as the model wrote them. A whole answer is
one `push` and `finish`, so a streamed answer and a non-streamed one are the same by construction.

A block that is not a call (no name, not JSON) is given back as content. Whitespace between blocks is
dropped. After `max_calls` calls, later blocks are dropped. Knows nothing of HTTP or wire types.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from megalodon_infer.tokenization.chat_template import TOOL_CALL_OPEN
from server.tool_calls import new_call_id

OPEN = TOOL_CALL_OPEN.strip()  # "<tool_call>": the newline after it is part of the block's body
CLOSE = "</tool_call>"
# A call's header as the template writes it, name first: what is read before arguments can stream.
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')


@dataclass
class ParsedCall:
    index: int
    id: str
    name: str
    arguments: str = ""


@dataclass
class CallDelta:
    """News about call `index`: `name` and `id` the first time, then `arguments` to append."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


@dataclass
class ParseDelta:
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)

    def extend(self, other: ParseDelta) -> None:
        self.content += other.content
        self.calls.extend(other.calls)


class ToolCallParser:
    """One answer's parse. `calls` holds every call read so far (complete once `finish` ran)."""

    def __init__(self, max_calls: int | None = None, new_id: Callable[[], str] = new_call_id) -> None:
        self.max_calls = max_calls
        self.calls: list[ParsedCall] = []
        self._new_id = new_id
        self._text = ""  # unread text outside a block (held back: might begin one)
        self._space = ""  # whitespace read outside blocks, sent once non-blank content follows
        self._body: str | None = None  # inside a block: its body so far
        self._call: ParsedCall | None = None  # the call whose header was read
        self._scan = _ValueScanner()

    def push(self, text: str) -> ParseDelta:
        """Take the next piece of text; return what it settles."""
        out = ParseDelta()
        if self._body is not None:
            self._body += text
        else:
            self._text += text
        while True:
            if self._body is None:
                out.content += self._read_text()
                if self._body is None:
                    return out
            else:
                out.extend(self._read_body())
                if self._body is not None:
                    return out

    def finish(self) -> ParseDelta:
        """The end of the answer: release held-back text, close an unterminated call."""
        out = ParseDelta()
        if self._body is not None:
            if self._call is None and self._room():
                out.content += self._release(OPEN + self._body)
            self._body, self._call = None, None
        out.content += self._release(self._text)
        self._text = ""
        if not self.calls:
            out.content += self._space
        self._space = ""
        return out

    # ------------------------------------------------------------------------------ outside
    def _read_text(self) -> str:
        start = self._text.find(OPEN)
        if start >= 0:
            before, self._text = self._text[:start], self._text[start + len(OPEN):]
            self._body, self._call, self._scan = self._text, None, _ValueScanner()
            self._text = ""
            content = self._release(before)
            self._space = ""  # the whitespace before a block is not content
            return content
        keep = _partial_suffix(self._text, OPEN)
        ready, self._text = self._text[:len(self._text) - keep], self._text[len(self._text) - keep:]
        return self._release(ready)

    def _release(self, text: str) -> str:
        """Content, with whitespace held until non-blank text follows it."""
        if not text:
            return ""
        if not text.strip():
            self._space += text
            return ""
        stripped = text.rstrip()
        out, self._space = self._space + stripped, text[len(stripped):]
        return out

    # ------------------------------------------------------------------------------- inside
    def _read_body(self) -> ParseDelta:
        body = self._body or ""
        out = ParseDelta()
        end = body.find(CLOSE)
        visible = body if end < 0 else body[:end]
        if self._call is None and self._room():
            match = _HEADER.match(visible)
            if match is not None:
                self._call = ParsedCall(len(self.calls), self._new_id(), json.loads(match.group(1)))
                self.calls.append(self._call)
                self._scan = _ValueScanner(match.end())
                out.calls.append(CallDelta(self._call.index, "", id=self._call.id, name=self._call.name))
        if self._call is not None:
            fragment = self._scan.advance(visible)
            if fragment:
                self._call.arguments += fragment
                out.calls.append(CallDelta(self._call.index, fragment))
        if end < 0:
            return out
        rest = body[end + len(CLOSE):]
        if self._call is None:
            out.extend(self._whole_block(visible))
        self._body, self._call, self._text = None, None, rest
        return out

    def _whole_block(self, body: str) -> ParseDelta:
        """A closed block whose header did not come name first: a JSON call in another key order, or
        content."""
        if not self._room():
            return ParseDelta()
        try:
            value = json.loads(body)
        except ValueError:
            value = None
        if isinstance(value, dict) and isinstance(value.get("name"), str) and "arguments" in value:
            arguments = value["arguments"]
            text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
            call = ParsedCall(len(self.calls), self._new_id(), value["name"], text)
            self.calls.append(call)
            return ParseDelta(calls=[CallDelta(call.index, text, id=call.id, name=call.name)])
        return ParseDelta(content=self._release(OPEN + body + CLOSE))

    def _room(self) -> bool:
        return self.max_calls is None or len(self.calls) < self.max_calls


class _ValueScanner:
    """Finds where a JSON value that starts at `start` ends, reading the text as it grows; what it has
    read of an object or array value is the call's `arguments` so far."""

    def __init__(self, start: int = 0) -> None:
        self.pos = start
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.done = False
        self.emitted_from = start

    def advance(self, text: str) -> str:
        """Scan what was added to `text`; return the part of the value not returned before."""
        while self.pos < len(text) and not self.done:
            char = text[self.pos]
            if self.depth == 0 and char not in "{[":
                if char.isspace() and self.emitted_from == self.pos:
                    self.emitted_from += 1
                else:
                    self.done = True  # a scalar or garbage where an object belongs: nothing streams
                    break
            elif self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                self.done = self.depth == 0
            self.pos += 1
        fragment = text[self.emitted_from:self.pos]
        self.emitted_from = self.pos
        return fragment


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker` (what must wait for more text)."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
