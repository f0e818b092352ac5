"""Streaming text out of generated tokens: incremental detokenization and stop strings.

Owns turning one request's token ids, as they arrive, into text deltas that never show a broken
character, and cutting the text at stop strings. Knows the tokenizer's decode rules but nothing of
sampling, scheduling or HTTP; the engine feeds it one token at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

from megalodon_infer.tokenizer import Tokenizer

# The longest UTF-8 encoding of one character.
MAX_UTF8_LEN = 4


def _utf8_lead(byte: int) -> tuple[int, int, int] | None:
    """For a byte that can start a multi-byte character: (length, lowest, highest second byte).

    The narrowed second-byte ranges (Unicode Table 3-7) rule out overlong forms, surrogates and
    code points above U+10FFFF, exactly the sequences sentencepiece (and Python) call invalid.
    """
    if 0xC2 <= byte <= 0xDF:
        return 2, 0x80, 0xBF
    if 0xE0 <= byte <= 0xEF:
        return 3, 0xA0 if byte == 0xE0 else 0x80, 0x9F if byte == 0xED else 0xBF
    if 0xF0 <= byte <= 0xF4:
        return 4, 0x90 if byte == 0xF0 else 0x80, 0x8F if byte == 0xF4 else 0xBF
    return None


def incomplete_utf8_tail(data: bytes) -> int:
    """Length of the trailing bytes of `data` that begin a valid UTF-8 character but do not
    finish it (0 to 3): exactly what more bytes could still turn into a character."""
    for length in range(1, min(len(data), MAX_UTF8_LEN - 1) + 1):
        if 0x80 <= data[-length] <= 0xBF:
            continue  # a continuation byte: the character, if any, starts further back
        lead = _utf8_lead(data[-length])
        if lead is None or length >= lead[0]:
            return 0
        if length >= 2 and not lead[1] <= data[-length + 1] <= lead[2]:
            return 0
        return length
    return 0


class IncrementalDetokenizer:
    """Text deltas of a request's generated tokens, one `push` per token.

    NOTE: the rule. The deltas of a request, joined (with `flush()` at the end), are exactly the
    text the generated ids add to the prompt:

        "".join(deltas) == decode(prompt + generated)[len(decode(prompt)):]

    so the space between the prompt's last word and the first generated word is kept (decoding
    the generated ids alone would strip it, as sentencepiece strips the first word's space), and
    an empty prompt (or just BOS) gives `decode(generated)`. Byte-fallback pieces that spell one
    character over several tokens emit nothing until the character is complete; bytes that can
    never form a character become U+FFFD, one per byte, exactly as in `decode`. When the prompt
    itself ends inside a character (token-id prompts can), those trailing byte tokens are counted
    with the completion, so a character finished by the model comes out whole.

    Work per token is O(1): only the byte tokens of an unfinished character (at most 3) are held,
    and each push decodes those plus the new token after a fixed anchor piece.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        num_held = self._unfinished_tail(prompt_ids)
        head = prompt_ids[: len(prompt_ids) - num_held]
        self._pending: list[int] = list(prompt_ids[len(head) :])
        self._text_started = tokenizer.text_started(head, skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Take the next generated token; return the text it completes (possibly "")."""
        self._pending.append(token_id)
        # Everything before an unfinished character is final, even bytes shown as U+FFFD.
        return self._release(len(self._pending) - self._unfinished_tail(self._pending))

    def flush(self) -> str:
        """At the end of generation: the held bytes of an unfinished character, as U+FFFD."""
        return self._release(len(self._pending))

    @property
    def num_held(self) -> int:
        """How many tokens wait for the rest of their character."""
        return len(self._pending)

    def _release(self, num_tokens: int) -> str:
        """Decode and drop the first `num_tokens` pending tokens, which end on a character boundary."""
        if num_tokens == 0:
            return ""
        text, self._text_started = self._tokenizer.decode_continuation(
            self._pending[:num_tokens],
            text_started=self._text_started,
            skip_special_tokens=self._skip_special_tokens,
        )
        del self._pending[:num_tokens]
        return text

    def _unfinished_tail(self, ids: Sequence[int]) -> int:
        """How many trailing ids are byte pieces of a character still waiting for bytes."""
        tail = bytearray()
        for token_id in reversed(ids[-(MAX_UTF8_LEN - 1) :]):
            value = self._tokenizer.byte_value(token_id)
            if value is None:
                break
            tail.insert(0, value)
        return incomplete_utf8_tail(bytes(tail))


class StopStringMatcher:
    """Cuts a stream of text deltas at the first stop string, even one split across deltas.

    `push(delta)` returns `(text_to_emit, stopped)`. Text that could be the start of a stop string
    is held back until it is known not to be one, so a stream never shows a prefix of a stop string
    that later completes; `flush()` releases it when generation ends for another reason (EOS,
    length). The stop string and everything after it are dropped, unless
    `include_stop_str_in_output`, which keeps the stop string itself. Empty stop strings are ignored.

    NOTE: when several stop strings occur, the one that *ends* first wins (a tie goes to the one
    starting first): generation stops the moment any stop string is complete, so the result does
    not depend on how the text was split into deltas.
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        self._stop = [s for s in dict.fromkeys(stop) if s]
        self._include_stop_str = include_stop_str_in_output
        self._held = ""
        self._matched: str | None = None

    @property
    def matched_stop(self) -> str | None:
        """The stop string that ended the stream (vLLM's `stop_reason`), or None."""
        return self._matched

    @property
    def stopped(self) -> bool:
        return self._matched is not None

    def push(self, delta: str) -> tuple[str, bool]:
        """Feed the next text delta; after a stop, further input is ignored."""
        if self._matched is not None:
            return "", True
        text = self._held + delta
        match = self._first_match(text)
        if match is not None:
            start, stop = match
            self._matched, self._held = stop, ""
            return text[: start + len(stop)] if self._include_stop_str else text[:start], True
        keep = self._longest_stop_prefix_suffix(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The held-back text, released because generation ended without a stop string."""
        text, self._held = self._held, ""
        return text

    def _first_match(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for stop in self._stop:
            start = text.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        return None if best is None else (best[1], best[2])

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
