"""Streaming text out of generated tokens: incremental detokenization and stop strings.

Owns turning one request's token ids, as they arrive, into text deltas that never show a broken
character, and cutting the text at stop strings. Knows the tokenizer's decode rules but nothing of
sampling, scheduling or HTTP; the engine feeds it one token at a time.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from megalodon_infer.tokenization.tokenizer import Tokenizer

# The longest UTF-8 encoding of one character.
MAX_UTF8_LEN = 4

# SentencePiece turns every byte of an invalid UTF-8 sequence into its own U+FFFD; Python's
# "replace" handler gives one per maximal invalid subsequence. This handler makes the stdlib
# decoder agree with sentencepiece.
_PER_BYTE_REPLACE = "megalodon.replace_per_byte"
codecs.register_error(_PER_BYTE_REPLACE, lambda err: ("\ufffd" * (err.end - err.start), err.end))


def utf8_decoder() -> codecs.IncrementalDecoder:
    """The stdlib incremental UTF-8 decoder, replacing invalid bytes as sentencepiece does."""
    return codecs.getincrementaldecoder("utf-8")(errors=_PER_BYTE_REPLACE)


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
    itself ends inside a character (token-id prompts can), its trailing bytes wait in the decoder
    and count with the completion, so a character finished by the model comes out whole.

    Each token's bytes go through Python's incremental UTF-8 decoder, which holds at most the 3
    bytes of an unfinished character: work per token is O(1).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._decoder = utf8_decoder()
        # Only the prompt's last few byte pieces can be an unfinished character: their completed
        # or invalid bytes are prompt text (dropped); what the decoder still holds waits for output.
        tail = 0
        while tail < min(len(prompt_ids), MAX_UTF8_LEN - 1) and tokenizer.byte_value(prompt_ids[-1 - tail]) is not None:
            tail += 1
        for token_id in prompt_ids[len(prompt_ids) - tail:]:
            self._decoder.decode(bytes([tokenizer.byte_value(token_id)]))
        head = prompt_ids[: len(prompt_ids) - self.num_held]
        self._text_started = tokenizer.text_started(head, skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Take the next generated token; return the text it completes (possibly "")."""
        tokenizer = self._tokenizer
        value = tokenizer.byte_value(token_id)
        if value is not None:
            text = self._decoder.decode(bytes([value]))
            self._text_started = self._text_started or bool(text)
            return text
        # Anything else ends an unfinished character (sentencepiece decodes it as invalid bytes).
        text = self._finish_character()
        if token_id in tokenizer.special_ids:
            if self._skip_special_tokens:
                return text
            self._text_started = True
            return text + tokenizer.id_to_piece(token_id)
        piece = tokenizer.token_text(token_id)
        if not self._text_started and piece.startswith(" ") and tokenizer.strips_leading_space:
            piece = piece[1:]  # sentencepiece's dummy-prefix space, at the very start of the text
            self._text_started = True
        self._text_started = self._text_started or bool(piece)
        return text + piece

    def flush(self) -> str:
        """At the end of generation: the held bytes of an unfinished character, as U+FFFD."""
        return self._finish_character()

    @property
    def num_held(self) -> int:
        """How many byte tokens wait for the rest of their character."""
        return len(self._decoder.getstate()[0])

    def _finish_character(self) -> str:
        if not self.num_held:
            return ""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        self._text_started = True
        return text


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
