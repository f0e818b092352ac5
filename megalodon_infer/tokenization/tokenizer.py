"""SentencePiece tokenizer for LLaMA-style models, plus the chat template.

Owns text <-> token ids: encoding prompts (BOS, special-token text), decoding ids exactly as
sentencepiece does, the per-token strings that logprobs report, and encoding chat messages rendered
with the model's Jinja2 template (or the documented default of `chat_template.py`). Knows nothing of
requests, sampling or HTTP; the incremental (streaming) decoder lives in `detokenizer.py`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from megalodon_infer.tokenization.chat_template import (
    DEFAULT_CHAT_TEMPLATE,
    compile_template,
    continuation_text,
    protect,
    render,
    select_chat_template,
)

TOKENIZER_MODEL_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# SentencePiece writes a space as U+2581 ("▁") inside pieces.
SPACE_MARK = "\u2581"

# A noncharacter, so no vocabulary has a piece for it; see `Tokenizer._check_sentinel`.
_SENTINEL = "\U0010ffff"

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Tokenizer:
    """A SentencePiece model with LLaMA conventions: BOS on prompts, EOS ends generation.

    Ids are ints in `[0, vocab_size)`. `special_ids` are the control pieces (`<s>`, `</s>`), the
    unknown piece and any extra special tokens named in `tokenizer_config.json`; decoding drops
    them unless `skip_special_tokens=False`, which renders them as their piece text (`"<s>"`).
    """

    def __init__(
        self,
        model_file_path: str | Path,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        extra_special_tokens: Iterable[str] = (),
        legacy: bool = True,
    ) -> None:
        """Load `model_file_path`; token arguments override the model's own BOS/EOS/pad pieces.

        `legacy` is HF's LLaMA flag for text that follows a special token inside a prompt: True
        (HF's default, and Meta's reference encoding) gives it sentencepiece's dummy-prefix space,
        like any text at the start of an encode; False encodes it as it stands. Raises `ValueError`
        if a named token is not a piece of the model.
        """
        self._sp = spm.SentencePieceProcessor(model_file=str(model_file_path))
        self._pieces: list[str] = self._sp.id_to_piece(list(range(self._sp.get_piece_size())))
        self._byte_values = [self._byte_value_of(i) for i in range(len(self._pieces))]
        self._control_ids = {i for i in range(len(self._pieces)) if self._sp.is_control(i)}

        self._bos_id = self._lookup(bos_token, self._sp.bos_id())
        self._eos_id = self._lookup(eos_token, self._sp.eos_id())
        self._pad_id = self._lookup(pad_token, self._sp.pad_id())
        named_ids = {self._lookup(token, -1) for token in extra_special_tokens}
        named_ids |= {i for i in (self._bos_id, self._eos_id, self._pad_id) if i >= 0}
        unknown_ids = {i for i in range(len(self._pieces)) if self._sp.is_unknown(i)}
        self._special_ids = frozenset(self._control_ids | unknown_ids | named_ids)
        # NOTE: sentencepiece itself hides control pieces; any other special (<unk>, a user-defined
        # "<|im_end|>") it would print, so skipping those needs decoding around them.
        self._visible_special_ids = self._special_ids - self._control_ids
        # <unk> stays literal text: parsing it would only turn a harmless string into a dead id.
        self._special_by_text = {self._pieces[i]: i for i in self._special_ids - unknown_ids}
        self._special_pattern = _alternation(self._special_by_text)

        # Special texts sentencepiece itself turns into their piece inside raw text (user-defined
        # pieces); literal text must break them up. Control pieces are never matched from text.
        self._matched_in_text = {text for text, i in self._special_by_text.items() if i in self._sp.encode(text)}
        self._literal_pattern = _alternation(self._matched_in_text)

        self._legacy = legacy
        self._sentinel_len = self._check_sentinel(required=not legacy)
        self._anchor_id, self._anchor_text = self._find_anchor()
        self._probe_id, self._probe_text = self._find_probe()
        # Whether decoding drops the first word's leading space (sentencepiece's dummy prefix).
        self.strips_leading_space = self._probe_id is not None and self._probe_text != self.token_text(self._probe_id)

        self._chat_template_source = chat_template
        self._chat_template = compile_template(chat_template or DEFAULT_CHAT_TEMPLATE)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer | None:
        """The tokenizer of a model directory, or None when it has no `tokenizer.model`.

        Reads the optional `tokenizer_config.json` (HF layout): `chat_template` (a string, or a list
        of `{name, template}` of which `default` is used), `bos_token`, `eos_token`, `pad_token`
        (strings or `{content: ...}` objects), `additional_special_tokens`, `added_tokens_decoder`
        entries marked `special`, and `legacy` (see `__init__`). A `chat_template.jinja` file, the
        newer HF layout, wins over the config's template.
        """
        directory = Path(path)
        model_file = directory / TOKENIZER_MODEL_FILE
        if not model_file.is_file():
            return None
        config: dict[str, Any] = {}
        config_file = directory / TOKENIZER_CONFIG_FILE
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
        chat_template = select_chat_template(config.get("chat_template"))
        template_file = directory / CHAT_TEMPLATE_FILE
        if template_file.is_file():
            chat_template = template_file.read_text(encoding="utf-8")
        return cls(
            model_file,
            chat_template=chat_template,
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
            pad_token=_token_content(config.get("pad_token")),
            extra_special_tokens=_config_special_tokens(config),
            legacy=config.get("legacy") is not False,
        )

    # ---- vocabulary ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        """The padding id, or -1 when the model has none (LLaMA has none)."""
        return self._pad_id

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special_ids

    @property
    def bos_token(self) -> str | None:
        return self._pieces[self._bos_id] if self._bos_id >= 0 else None

    @property
    def eos_token(self) -> str | None:
        return self._pieces[self._eos_id] if self._eos_id >= 0 else None

    @property
    def pad_token(self) -> str | None:
        return self._pieces[self._pad_id] if self._pad_id >= 0 else None

    @property
    def chat_template(self) -> str:
        """The template in use: the model's own, else `DEFAULT_CHAT_TEMPLATE`."""
        return self._chat_template_source or DEFAULT_CHAT_TEMPLATE

    @property
    def has_chat_template(self) -> bool:
        """Whether the model ships its own template (False means the default is used)."""
        return self._chat_template_source is not None

    def id_to_piece(self, token_id: int) -> str:
        return self._pieces[self._check_id(token_id)]

    def piece_to_id(self, piece: str) -> int:
        """The id of `piece`, or the unknown id when the vocabulary lacks it (sentencepiece's rule)."""
        return self._sp.piece_to_id(piece)

    def byte_value(self, token_id: int) -> int | None:
        """The raw byte of a byte-fallback piece `<0xNN>`, else None."""
        return self._byte_values[self._check_id(token_id)]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes this token adds to the text: a byte piece's raw byte, a word piece's UTF-8
        with `▁` as a space, a special token's piece text. Joining them is exact wherever no
        dummy-prefix space is stripped (see `decode`)."""
        value = self.byte_value(token_id)
        if value is not None:
            return bytes([value])
        return self.token_text(token_id).encode("utf-8")

    def token_text(self, token_id: int) -> str:
        """The token as a string, for logprobs and `/tokenize` token strings.

        NOTE: vLLM's convention: the token decoded on its own, so a byte piece that is only part
        of a character shows as U+FFFD. Unlike a bare `decode([id])` the leading space is kept
        (`"▁the"` -> `" the"`), as OpenAI's token strings carry it. Special tokens show their text.
        """
        value = self.byte_value(token_id)
        if value is not None:
            return bytes([value]).decode("utf-8", errors="replace")
        return self._pieces[token_id].replace(SPACE_MARK, " ")

    # ---- encode / decode -------------------------------------------------------------------------

    def encode(
        self,
        text: str,
        add_bos: bool = True,
        add_eos: bool = False,
        parse_special_tokens: bool = False,
    ) -> list[int]:
        """Token ids of `text`, with BOS first and/or EOS last when asked.

        NOTE: special tokens come from the chat template (`encode_chat`), from explicit token ids,
        or from `add_bos`/`add_eos`, never from user text: by default the text of a special token
        (`"<s>"`, `"</s>"`, `"<|im_end|>"`) is encoded as the text it is. `parse_special_tokens`
        (for text the server itself wrote, such as a rendered template) turns those texts into their
        ids; each stretch between them is encoded on its own, with or without the dummy-prefix space
        as `legacy` says.
        """
        return self._encode(text, add_bos, add_eos, parse_special_tokens, {})

    def _encode(self, text: str, add_bos: bool, add_eos: bool, parse_special_tokens: bool,
                protected: dict[str, str], lead_continuation: bool = False) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates: sentencepiece would raise a RuntimeError
            raise ValueError(f"text is not valid Unicode: {exc.reason} at position {exc.start}") from None
        ids: list[int] = [self._bos_id] if add_bos and self._bos_id >= 0 else []
        if parse_special_tokens and self._special_pattern is not None:
            for index, part in enumerate(self._special_pattern.split(text)):
                if part in self._special_by_text:
                    ids.append(self._special_by_text[part])
                elif part:
                    continuation = (not self._legacy) if index > 0 else lead_continuation
                    ids.extend(self._encode_literal(part, continuation=continuation, protected=protected))
        elif text:
            ids.extend(self._encode_literal(text, continuation=lead_continuation, protected=protected))
        if add_eos and self._eos_id >= 0:
            ids.append(self._eos_id)
        return ids

    @property
    def encodes_continuations(self) -> bool:
        """Whether `encode_continuation` is exact (the model keeps U+10FFFF apart: byte fallback)."""
        return bool(self._sentinel_len)

    def encode_continuation(self, text: str) -> list[int]:
        """Token ids of `text` as it continues earlier text: no dummy-prefix space, and special-token
        text encoded as text. Raises ValueError where the model cannot encode without the dummy
        prefix (no byte fallback; see `encodes_continuations`)."""
        if not self._sentinel_len:
            raise ValueError("this tokenizer cannot encode text without its dummy-prefix space (no byte fallback)")
        return self._encode_literal(text, continuation=True, protected={})

    def _encode_literal(self, text: str, *, continuation: bool, protected: dict[str, str]) -> list[int]:
        """`text` as text: never a special token's id. `protected` maps stand-in characters back to
        the special text they replaced. A special text sentencepiece would match is encoded in two
        pieces (its first character, then the rest), which cannot be the special piece."""
        for stand_in, special in protected.items():
            text = text.replace(stand_in, special)
        if self._literal_pattern is None:
            return self._encode_run(text, continuation)
        ids: list[int] = []
        for part in self._literal_pattern.split(text):
            if not part:
                continue
            if part in self._matched_in_text:
                ids.extend(self._encode_run(part[:1], continuation or bool(ids)))
                ids.extend(self._encode_run(part[1:], True))
            else:
                ids.extend(self._encode_run(part, continuation or bool(ids)))
        return ids

    def _encode_run(self, text: str, continuation: bool) -> list[int]:
        """sentencepiece's encoding of `text`; as a continuation, without the dummy-prefix space."""
        if not continuation or not self._sentinel_len:
            return self._sp.encode(text)
        return self._sp.encode(_SENTINEL + text)[self._sentinel_len:]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`; raises `ValueError` for an id outside the vocabulary.

        With `skip_special_tokens` this equals sentencepiece's own decode for any ids without
        `<unk>` (which sentencepiece prints as " ⁇ " and we drop, as HF does): the first word's
        dummy-prefix space is stripped, and byte pieces that do not form valid UTF-8 become one
        U+FFFD per byte. Without it, special tokens appear as their piece text.
        """
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= len(self._pieces)):
            bad = next(i for i in ids if not 0 <= i < len(self._pieces))
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {len(self._pieces)}).")
        text, _ = self.decode_continuation(ids, text_started=False, skip_special_tokens=skip_special_tokens)
        return text

    def decode_continuation(
        self, ids: Sequence[int], *, text_started: bool, skip_special_tokens: bool = True
    ) -> tuple[str, bool]:
        """Decode `ids` as the continuation of earlier tokens; return `(text, text_started_after)`.

        `text_started` says whether the earlier tokens already produced text (or consumed the
        dummy-prefix space): only at the very start does sentencepiece strip a word's leading
        space. The earlier tokens must end on a character boundary (no unfinished byte sequence).
        Then `decode(a + b) == decode(a) + decode_continuation(b, text_started=started(a))[0]`,
        which is what lets `IncrementalDetokenizer` decode a few tokens at a time.
        """
        hidden = self._visible_special_ids if skip_special_tokens else self._special_ids
        parts: list[str] = []
        if hidden.isdisjoint(ids):  # the common case, kept to one call into sentencepiece
            text_started = self._decode_run(ids, text_started, parts)
            return "".join(parts), text_started
        run_start = 0
        for index, token_id in enumerate(ids):
            if token_id in hidden:
                text_started = self._decode_run(ids[run_start:index], text_started, parts)
                if not skip_special_tokens:
                    parts.append(self._pieces[token_id])
                    text_started = True
                run_start = index + 1
        text_started = self._decode_run(ids[run_start:], text_started, parts)
        return "".join(parts), text_started

    def text_started(self, ids: Sequence[int], skip_special_tokens: bool = True) -> bool:
        """Whether decoding `ids` has begun the text (see `decode_continuation`)."""
        # A token that shows anything (or eats the dummy-prefix space) settles it, and that is
        # nearly always one of the first few, so the whole sequence is decoded only if it is blank.
        for end in sorted({min(len(ids), 8), len(ids)}):
            if self.decode_continuation(ids[:end], text_started=False, skip_special_tokens=skip_special_tokens)[1]:
                return True
        return False

    # ---- chat ------------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> str:
        """Render `messages` (`{"role": str, "content": str}`, an assistant message may carry
        `tool_calls` and then a None content) with the chat template.

        The template sees `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, the
        helpers `raise_exception(msg)` and `strftime_now(fmt)` and the `tojson` filter (as in HF),
        and `template_kwargs` (`tools`: OpenAI function definitions). Raises `ValueError` for
        malformed messages or when the template rejects them.
        """
        return render(self._chat_template, messages, add_generation_prompt, self._template_context(template_kwargs))

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        continue_final_message: bool = False, **template_kwargs: Any
    ) -> list[int]:
        """Token ids of the rendered chat prompt, with exactly one BOS.

        Special tokens come from the template only: special-token text anywhere in the messages
        (content, tool calls) and in the `tools` definitions is held aside while the template renders
        (a noncharacter stands in for it; text that contains noncharacters is refused) and is
        encoded as text. `continue_final_message` leaves the last message open for the model to
        continue (the rendering is cut right after it).

        NOTE: HF convention: a template that writes the BOS text itself (most LLaMA templates
        start with `{{ bos_token }}`) gets it parsed into the BOS id and no second one is added;
        otherwise BOS is prepended as for any prompt.
        """
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true.")
        found: dict[str, str] = {}
        messages = protect(messages, self._special_pattern, found)
        template_kwargs = self._protect_kwargs(template_kwargs, found)
        text = self.apply_chat_template(messages, add_generation_prompt, **template_kwargs)
        if continue_final_message and messages:
            final = messages[-1].get("content") or ""
            end = text.rfind(final) if final else -1
            if end >= 0:
                text = text[: end + len(final)]
        has_bos = self.bos_token is not None and text.startswith(self.bos_token)
        return self._encode(text, not has_bos, False, True, _stand_ins(found))

    def encode_chat_continuation(
        self, messages: list[dict[str, Any]], new_messages: list[dict[str, Any]], *, history_ids: Sequence[int],
        **template_kwargs: Any
    ) -> list[int] | None:
        """The ids that follow a conversation's exact history: the assistant's reply to `messages`
        closed, `new_messages`, and the generation prompt; None if the template cannot say.

        `history_ids` are the ids so far: `encode_chat(messages)` (or an earlier continuation) and
        then what the model generated. When the reply ended with EOS and the template closes a turn
        with EOS, that EOS is already in the history and is not repeated. Text right after a special
        token is encoded as `encode_chat` encodes it there (the `legacy` rule); after generated text,
        without a dummy-prefix space. So `history_ids + continuation` is what the model would read
        had the conversation been one prompt, turn by turn, with the replies as generated.
        """
        found: dict[str, str] = {}
        messages = protect(messages, self._special_pattern, found)
        new_messages = protect(new_messages, self._special_pattern, found)
        context = self._template_context(self._protect_kwargs(template_kwargs, found))
        text = continuation_text(self._chat_template, messages, new_messages, context)
        if text is None:
            return None
        last = history_ids[-1] if history_ids else None
        eos = self.eos_token
        if last == self._eos_id and eos and text.startswith(eos):
            text = text[len(eos):]
        after_special = last is None or last in self._special_ids
        return self._encode(text, False, False, True, _stand_ins(found),
                            lead_continuation=(not self._legacy) if after_special else True)

    def _template_context(self, template_kwargs: dict[str, Any]) -> dict[str, Any]:
        return {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                "pad_token": self.pad_token or "", **template_kwargs}

    def _protect_kwargs(self, template_kwargs: dict[str, Any], found: dict[str, str]) -> dict[str, Any]:
        if template_kwargs.get("tools"):
            return {**template_kwargs, "tools": protect(template_kwargs["tools"], self._special_pattern, found)}
        return template_kwargs

    # ---- internals -------------------------------------------------------------------------------

    def _check_id(self, token_id: int) -> int:
        if not 0 <= token_id < len(self._pieces):
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {len(self._pieces)}).")
        return token_id

    def _byte_value_of(self, token_id: int) -> int | None:
        if not self._sp.is_byte(token_id):
            return None
        match = _BYTE_PIECE.fullmatch(self._pieces[token_id])
        return int(match.group(1), 16) if match else None

    def _lookup(self, token: str | None, default_id: int) -> int:
        if token is None:
            return default_id
        token_id = self._sp.piece_to_id(token)
        if self._pieces[token_id] != token:
            raise ValueError(f"special token {token!r} is not a piece of the tokenizer model.")
        return token_id

    def _check_sentinel(self, required: bool) -> int:
        # NOTE: sentencepiece always adds the dummy-prefix space. To encode text without it we put
        # a character no piece contains in front (it falls back to bytes, which never merge with
        # their neighbours) and drop its tokens again. Returns 0 where the model cannot do this.
        sentinel_ids = self._sp.encode(_SENTINEL)
        if self._sp.encode(_SENTINEL + "a")[: len(sentinel_ids)] != sentinel_ids:
            if required:
                raise ValueError("legacy=False needs a model that keeps U+10FFFF apart (byte fallback).")
            return 0
        return len(sentinel_ids)

    def _find_anchor(self) -> tuple[int, str]:
        # NOTE: sentencepiece strips the leading space of the first word only at the start of the
        # text. To decode a continuation we put a fixed piece with known text in front ("anchor")
        # and cut its text off again; it must not start with a space mark itself.
        candidates = [
            i
            for i, piece in enumerate(self._pieces)
            if i not in self._special_ids and self._byte_values[i] is None and SPACE_MARK not in piece
        ]
        candidates += [i for i, value in enumerate(self._byte_values) if value is not None and value < 0x80]
        for token_id in candidates:
            text = self._sp.decode([token_id])
            if text and self._sp.decode([token_id, token_id]) == text + text:
                return token_id, text
        raise ValueError("the tokenizer model has no plain piece to anchor incremental decoding on.")

    def _find_probe(self) -> tuple[int | None, str]:
        # A word piece with a leading space mark: it decodes differently at the start of the text
        # (space stripped) than after text has begun, which is how `_consumes_start` tests a prefix.
        for token_id, piece in enumerate(self._pieces):
            if token_id not in self._special_ids and piece.startswith(SPACE_MARK) and len(piece) > 1:
                return token_id, self._sp.decode([token_id])
        return None, ""

    def _decode_run(self, run: Sequence[int], text_started: bool, parts: list[str]) -> bool:
        if not run:
            return text_started
        if text_started:
            text = self._sp.decode([self._anchor_id, *run])[len(self._anchor_text) :]
        else:
            text = self._sp.decode(list(run))
        parts.append(text)
        return text_started or bool(text) or self._consumes_start(run)

    def _consumes_start(self, run: Sequence[int]) -> bool:
        # A run that printed nothing may still have eaten the dummy-prefix space (a lone "▁").
        if self._probe_id is None:
            return False
        return self._sp.decode([*run, self._probe_id]) != self._probe_text


def _stand_ins(found: dict[str, str]) -> dict[str, str]:
    """stand-in -> the special text it replaced (what `_encode_literal` puts back)."""
    return {stand_in: special for special, stand_in in found.items()}


def _alternation(texts: Iterable[str]) -> re.Pattern[str] | None:
    """A regex that splits text on any of `texts`, keeping them as separate parts."""
    # Longest first, so "<|im_end|>" is not cut short by a special token that prefixes it.
    alternatives = sorted(texts, key=len, reverse=True)
    if not alternatives:
        return None
    return re.compile("(" + "|".join(re.escape(text) for text in alternatives) + ")")


def _token_content(token: Any) -> str | None:
    """HF writes a token either as its text or as an AddedToken object `{"content": text, ...}`."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _config_special_tokens(config: dict[str, Any]) -> list[str]:
    tokens = [_token_content(token) for token in config.get("additional_special_tokens") or []]
    for entry in (config.get("added_tokens_decoder") or {}).values():
        if isinstance(entry, dict) and entry.get("special"):
            tokens.append(_token_content(entry))
    return [token for token in tokens if token]
