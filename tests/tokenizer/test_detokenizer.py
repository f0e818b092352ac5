"""Streaming detokenization and stop strings: what a client sees, delta by delta."""

from __future__ import annotations

import random

import pytest

from megalodon_infer.tokenization.detokenizer import IncrementalDetokenizer, StopStringMatcher, utf8_decoder
from megalodon_infer.tokenization.tokenizer import Tokenizer
from tests.tokenizer.conftest import byte_id, random_text

REPLACEMENT = "\ufffd"


def stream(tokenizer: Tokenizer, prompt_ids: list[int], generated: list[int], skip: bool = True) -> list[str]:
    """The deltas a client receives: one per generated token, then the final flush."""
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip)
    deltas = [detokenizer.push(token_id) for token_id in generated]
    return [*deltas, detokenizer.flush()]


# ---- IncrementalDetokenizer -------------------------------------------------------------------


def test_deltas_rebuild_random_text_without_broken_characters(tokenizer: Tokenizer) -> None:
    rng = random.Random(2024)
    for _ in range(200):
        text = random_text(rng, max_chars=60)
        generated = tokenizer.encode(text, add_bos=False, parse_special_tokens=False)
        deltas = stream(tokenizer, [tokenizer.bos_id], generated)
        assert "".join(deltas) == text
        assert not any(REPLACEMENT in delta for delta in deltas)


def test_deltas_equal_what_the_tokens_add_to_the_prompt(tokenizer: Tokenizer) -> None:
    """Random splits of random id sequences (byte pieces, controls, spaces, words): the deltas are
    decode(prompt + generated) minus decode(prompt), with and without special tokens."""
    rng = random.Random(11)
    byte_ids = [byte_id(tokenizer, value) for value in range(256)]
    for _ in range(1500):
        ids = [
            rng.choice(byte_ids) if rng.random() < 0.4 else rng.randrange(tokenizer.vocab_size)
            for _ in range(rng.randint(0, 12))
        ]
        split = rng.randint(0, len(ids))
        prompt, generated = ids[:split], ids[split:]
        for skip in (True, False):
            prompt_text = tokenizer.decode(prompt, skip_special_tokens=skip)
            if prompt_text.endswith(REPLACEMENT):
                continue  # the prompt may end inside a character: see the test below
            full_text = tokenizer.decode(ids, skip_special_tokens=skip)
            assert full_text.startswith(prompt_text)
            assert "".join(stream(tokenizer, prompt, generated, skip)) == full_text[len(prompt_text) :], ids


def test_space_after_the_prompt_is_kept(tokenizer: Tokenizer) -> None:
    text = "The quick brown fox jumps over the lazy dog"
    ids = tokenizer.encode(text)
    for split in range(2, len(ids)):
        prompt_text = tokenizer.decode(ids[:split])
        completion = "".join(stream(tokenizer, ids[:split], ids[split:]))
        assert prompt_text + completion == text
    first_word = tokenizer.encode("brown", add_bos=False)
    assert tokenizer.decode(first_word) == "brown"  # decoded alone the space is lost ...
    assert "".join(stream(tokenizer, tokenizer.encode("The quick"), first_word)) == " brown"  # ... not here


def test_emoji_over_byte_tokens_appears_once_complete(tokenizer: Tokenizer) -> None:
    grin = [byte_id(tokenizer, b) for b in "😀".encode()]
    hello = tokenizer.encode("Hello", add_bos=False)
    deltas = stream(tokenizer, tokenizer.encode("Say"), [*grin, *hello])
    assert deltas[:3] == ["", "", ""]
    assert deltas[3] == "😀"
    assert "".join(deltas) == tokenizer.decode([*tokenizer.encode("Say"), *grin, *hello])[len("Say") :]


def test_invalid_bytes_become_replacement_characters_like_decode(tokenizer: Tokenizer) -> None:
    euro = [byte_id(tokenizer, b) for b in "€".encode()]
    word = tokenizer.encode("ok", add_bos=False)
    # E2 82 could still become "€": held. A word piece proves it never will: one U+FFFD per byte.
    deltas = stream(tokenizer, [tokenizer.bos_id], [*euro[:2], *word])
    assert deltas[:2] == ["", ""]
    assert "".join(deltas) == tokenizer.decode(euro[:2] + word) == REPLACEMENT * 2 + " ok"
    # A lone continuation byte can never start a character, so it is not held at all.
    assert stream(tokenizer, [tokenizer.bos_id], [byte_id(tokenizer, 0x80)])[0] == REPLACEMENT


def test_a_surrogate_prefix_becomes_one_replacement_per_byte_like_decode(tokenizer: Tokenizer) -> None:
    surrogate = [byte_id(tokenizer, b) for b in (0xED, 0xA0, 0x80)]
    word = tokenizer.encode("ok", add_bos=False)
    for num_bytes, tail in ((3, word), (2, word), (2, [])):
        generated = surrogate[:num_bytes] + tail
        text = tokenizer.decode([tokenizer.bos_id, *generated])
        assert "".join(stream(tokenizer, [tokenizer.bos_id], generated)) == text
        assert text.startswith(REPLACEMENT * num_bytes)


def test_flush_releases_an_unfinished_character(tokenizer: Tokenizer) -> None:
    euro = [byte_id(tokenizer, b) for b in "€".encode()]
    detokenizer = IncrementalDetokenizer(tokenizer, [tokenizer.bos_id])
    assert detokenizer.push(euro[0]) == detokenizer.push(euro[1]) == ""
    assert detokenizer.num_held == 2
    assert detokenizer.flush() == tokenizer.decode(euro[:2]) == REPLACEMENT * 2
    assert detokenizer.num_held == 0


def test_prompt_ending_inside_a_character_is_completed_by_the_output(tokenizer: Tokenizer) -> None:
    grin = [byte_id(tokenizer, b) for b in "😀".encode()]
    prompt = [*tokenizer.encode("x"), *grin[:2]]
    assert "".join(stream(tokenizer, prompt, grin[2:])) == "😀"


def test_special_tokens_are_hidden_or_shown(tokenizer: Tokenizer) -> None:
    generated = [*tokenizer.encode("yes", add_bos=False), tokenizer.eos_id]
    assert "".join(stream(tokenizer, [tokenizer.bos_id], generated)) == "yes"
    assert "".join(stream(tokenizer, [tokenizer.bos_id], generated, skip=False)) == " yes</s>"


def test_held_tokens_stay_bounded(tokenizer: Tokenizer) -> None:
    """However long the stream (here 20k random byte pieces), at most 3 tokens wait."""
    rng = random.Random(3)
    detokenizer = IncrementalDetokenizer(tokenizer, [tokenizer.bos_id])
    for _ in range(20_000):
        detokenizer.push(byte_id(tokenizer, rng.choice([0xF0, 0x9F, 0x98, 0x80, 0xE2, 0x41])))
        assert detokenizer.num_held <= 3


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0),
        (b"abc", 0),
        (b"a\xe2", 1),
        (b"a\xe2\x82", 2),
        (b"\xf0\x9f\x98", 3),
        (b"\xf0\x9f\x98\x80", 0),
        (b"\xe2\x82\xac", 0),
        # NOTE: would be a surrogate, never valid; Python's decoder only rejects it at the third
        # byte, so it is held one token longer (the text is the same: see the test below).
        (b"\xed\xa0", 2),
        (b"\xc0", 0),  # overlong lead byte: never valid
        (b"\x80\x80", 0),
        (b"\xe0\x80", 0),  # overlong three-byte form
        (b"\xf4\x90", 0),  # above U+10FFFF
        (b"\xe2\x41", 0),
        (b"\xe2\xe2", 1),
    ],
)
def test_decoder_holds_exactly_the_bytes_that_can_still_become_a_character(data: bytes, expected: int) -> None:
    decoder = utf8_decoder()
    decoder.decode(data)
    assert len(decoder.getstate()[0]) == expected


# ---- StopStringMatcher ------------------------------------------------------------------------


def feed(matcher: StopStringMatcher, deltas: list[str]) -> list[str]:
    """What a client receives for `deltas`, with the flush appended when nothing stopped."""
    out = []
    for delta in deltas:
        text, stopped = matcher.push(delta)
        out.append(text)
        if stopped:
            return out
    return [*out, matcher.flush()]


def test_stop_string_split_across_deltas_is_cut() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("Hello wo") == ("Hello wo", False)
    assert matcher.push("rld! ST") == ("rld! ", False)  # "ST" might begin "STOP": held
    assert matcher.push("OP and more") == ("", True)
    assert matcher.matched_stop == "STOP" and matcher.stopped
    assert matcher.push("ignored") == ("", True)


def test_stop_string_is_kept_when_asked() -> None:
    matcher = StopStringMatcher(["STOP"], include_stop_str_in_output=True)
    assert "".join(feed(matcher, ["Hello ST", "OP and more"])) == "Hello STOP"


def test_held_prefix_is_released_when_it_cannot_be_a_stop() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("abc ST") == ("abc ", False)
    assert matcher.push("ART") == ("START", False)
    assert matcher.flush() == ""


def test_flush_releases_held_text_when_generation_ends() -> None:
    matcher = StopStringMatcher(["</answer>", "\n\n"])
    assert feed(matcher, ["42</ans", "w"]) == ["42", "", "</answ"]
    assert matcher.matched_stop is None


def test_earliest_ending_stop_wins_regardless_of_chunking() -> None:
    rng = random.Random(8)
    alphabet = "ab c\n"
    for _ in range(500):
        stops = ["".join(rng.choices(alphabet, k=rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 30)))
        include = rng.random() < 0.5
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(3, len(text) + 1)))
        chunkings = [
            [text],
            list(text),
            [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)],
        ]
        results = set()
        for chunks in chunkings:
            matcher = StopStringMatcher(stops, include)
            results.add(("".join(feed(matcher, chunks)), matcher.matched_stop))
        assert len(results) == 1, (stops, text, results)
    assert feed(StopStringMatcher(["abcd", "bc"]), ["abcd"]) == ["a"]


def test_streamed_prefix_of_output_never_shows_a_stop_string() -> None:
    rng = random.Random(9)
    for _ in range(300):
        stops = ["".join(rng.choices("xy", k=rng.randint(1, 3))) for _ in range(2)]
        chunks = ["".join(rng.choices("xyz", k=rng.randint(0, 3))) for _ in range(10)]
        shown = ""
        matcher = StopStringMatcher(stops)
        for chunk in chunks:
            text, stopped = matcher.push(chunk)
            shown += text
            assert not any(stop in shown for stop in stops)
            if stopped:
                break


def test_detokenized_stream_stops_on_text_spanning_tokens(tokenizer: Tokenizer) -> None:
    """End to end: a stop string across token boundaries (and one inside an emoji's byte tokens)."""
    source = "def f():\n    return 1\n\nclass B:\n    pass\n"
    for stop, expected in [("\n\n", "def f():\n    return 1"), ("s B", "def f():\n    return 1\n\nclas")]:
        assert _generate_until(tokenizer, source, [stop]) == expected
    assert _generate_until(tokenizer, "ok 😀 then 😀 more", ["😀"]) == "ok "
    assert _generate_until(tokenizer, "no stop here", ["zzz"]) == "no stop here"


def _generate_until(tokenizer: Tokenizer, text: str, stop: list[str]) -> str:
    detokenizer = IncrementalDetokenizer(tokenizer, [tokenizer.bos_id])
    matcher = StopStringMatcher(stop)
    out = []
    for token_id in tokenizer.encode(text, add_bos=False, parse_special_tokens=False):
        emitted, stopped = matcher.push(detokenizer.push(token_id))
        out.append(emitted)
        if stopped:
            return "".join(out)
    emitted, _ = matcher.push(detokenizer.flush())
    return "".join([*out, emitted, matcher.flush()])
