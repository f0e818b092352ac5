"""SentencePiece tokenizer for LLaMA-style models, plus the chat template.

Owns text <-> token ids: encoding prompts (BOS, special-token text), decoding ids exactly as
sentencepiece does, the per-token strings that logprobs report, and rendering chat messages with
the model's Jinja2 template (or a documented default). Knows nothing of requests, sampling or HTTP;
the incremental (streaming) decoder lives in `detokenizer.py` and builds on `decode_continuation`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import sentencepiece as spm
from jinja2.sandbox import ImmutableSandboxedEnvironment

TOKENIZER_MODEL_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# SentencePiece writes a space as U+2581 ("▁") inside pieces.
SPACE_MARK = "\u2581"

# NOTE: the default chat template, used when a model ships none. It is a plain-text layout in the
# style of Zephyr that needs no extra vocabulary, only the tokenizer's own BOS and EOS:
#
#     <s><|system|>\n{system}</s><|user|>\n{user}</s><|assistant|>\n
#
# Each message is `<|{role}|>\n{content}` closed by EOS, so a model that learned the layout ends
# its turn with EOS and generation stops there; `add_generation_prompt` appends the open assistant
# header. Every header directly follows a special token, so each turn is tokenized the same way
# wherever it sits. Any role name is accepted; content must be a string.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

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

        self._legacy = legacy
        self._sentinel_len = self._check_sentinel() if not legacy else 0
        self._anchor_id, self._anchor_text = self._find_anchor()
        self._probe_id, self._probe_text = self._find_probe()

        self._chat_template_source = chat_template
        self._chat_template = _compile_template(chat_template or DEFAULT_CHAT_TEMPLATE)

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
        chat_template = _select_chat_template(config.get("chat_template"))
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
        parse_special_tokens: bool = True,
    ) -> list[int]:
        """Token ids of `text`, with BOS first and/or EOS last when asked.

        With `parse_special_tokens` (HF's and vLLM's behaviour), the text of a special token
        (`"<s>"`, `"</s>"`, configured extras) becomes that token's id; each stretch between them is
        encoded on its own, with or without the dummy-prefix space as `legacy` says. Without it
        the text is encoded literally.
        """
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates: sentencepiece would raise a RuntimeError
            raise ValueError(f"text is not valid Unicode: {exc.reason} at position {exc.start}") from None
        ids: list[int] = [self._bos_id] if add_bos and self._bos_id >= 0 else []
        if parse_special_tokens and self._special_pattern is not None:
            for index, part in enumerate(self._special_pattern.split(text)):
                if part in self._special_by_text:
                    ids.append(self._special_by_text[part])
                elif part and (self._legacy or index == 0):
                    ids.extend(self._sp.encode(part))
                elif part:
                    ids.extend(self._sp.encode(_SENTINEL + part)[self._sentinel_len :])
        elif text:
            ids.extend(self._sp.encode(text))
        if add_eos and self._eos_id >= 0:
            ids.append(self._eos_id)
        return ids

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
        """Render `messages` (`{"role": str, "content": str}`) with the chat template.

        The template sees `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, the
        helpers `raise_exception(msg)` and `strftime_now(fmt)` (as in HF), and `template_kwargs`.
        Raises `ValueError` for malformed messages or when the template rejects them.
        """
        for message in messages:
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise ValueError(f"each message needs a string 'role' and 'content', got {message!r}.")
        context = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "pad_token": self.pad_token or "",
            **template_kwargs,
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._chat_template.render(**context)
        except jinja2.TemplateError as error:
            raise ValueError(f"chat template error: {error}") from error

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> list[int]:
        """Token ids of the rendered chat prompt, with exactly one BOS.

        NOTE: HF convention: a template that writes the BOS text itself (most LLaMA templates
        start with `{{ bos_token }}`) gets it parsed into the BOS id and no second one is added;
        otherwise BOS is prepended as for any prompt.
        """
        text = self.apply_chat_template(messages, add_generation_prompt, **template_kwargs)
        has_bos = self.bos_token is not None and text.startswith(self.bos_token)
        return self.encode(text, add_bos=not has_bos, parse_special_tokens=True)

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

    def _check_sentinel(self) -> int:
        # NOTE: sentencepiece always adds the dummy-prefix space. To encode text without it we put
        # a character no piece contains in front (it falls back to bytes, which never merge with
        # their neighbours) and drop its tokens again.
        sentinel_ids = self._sp.encode(_SENTINEL)
        if self._sp.encode(_SENTINEL + "a")[: len(sentinel_ids)] != sentinel_ids:
            raise ValueError("legacy=False needs a model that keeps U+10FFFF apart (byte fallback).")
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


def _alternation(texts: Iterable[str]) -> re.Pattern[str] | None:
    """A regex that splits text on any of `texts`, keeping them as separate parts."""
    # Longest first, so "<|im_end|>" is not cut short by a special token that prefixes it.
    alternatives = sorted(texts, key=len, reverse=True)
    if not alternatives:
        return None
    return re.compile("(" + "|".join(re.escape(text) for text in alternatives) + ")")


def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(f"chat template does not compile: {error}") from error


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _token_content(token: Any) -> str | None:
    """HF writes a token either as its text or as an AddedToken object `{"content": text, ...}`."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _select_chat_template(template: Any) -> str | None:
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def _config_special_tokens(config: dict[str, Any]) -> list[str]:
    tokens = [_token_content(token) for token in config.get("additional_special_tokens") or []]
    for entry in (config.get("added_tokens_decoder") or {}).values():
        if isinstance(entry, dict) and entry.get("special"):
            tokens.append(_token_content(entry))
    return [token for token in tokens if token]
