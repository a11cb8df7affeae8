"""Stop strings and streaming text (leanformers.generation.text.TextAssembler).

The specification the tests hold the assembler to:
- generation stops after the first token whose text contains a stop string; the result is the text up to
  the earliest occurrence of any stop string in it;
- the streamed pieces join to the result, and every prefix of the stream is a prefix of the result: a
  piece never holds any part of the stop string that ended the generation;
- while running, the stream holds back exactly the longest tail that could still start a stop string
  (and an incomplete UTF-8 character), nothing more.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import leanformers
from leanformers.generation.text import TextAssembler


class _Chunks:
    """A tokenizer whose token i is the byte string chunks[i]; like real byte-level decoders, an incomplete
    UTF-8 character at the end decodes as U+FFFD."""

    def __init__(self, chunks: list[bytes]):
        self.chunks = chunks

    def decode(self, ids, skip_special_tokens=False):
        return b"".join(self.chunks[i] for i in ids).decode("utf-8", errors="replace")


def _split(text: str, cuts=None) -> list[bytes]:
    """text's UTF-8 bytes cut at the given byte offsets (default: one token per byte)."""
    data = text.encode()
    cuts = sorted(set(c for c in (cuts if cuts is not None else range(1, len(data))) if 0 < c < len(data)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def expected(chunks: list[bytes], stop) -> tuple[str, bool]:
    """The result by the specification: decode after every token, stop at the first text with a stop string."""
    tok = _Chunks(chunks)
    stop = [s for s in stop if s]
    for n in range(1, len(chunks) + 1):
        text = tok.decode(range(n))
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            return text[: min(hits)], True
    return tok.decode(range(len(chunks))), False


def _held_back(text: str, stop) -> int:
    """How much of `text` (not stopped) may not be streamed yet: a trailing incomplete character, then the
    longest tail that is a proper prefix of a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for start in range(max(0, end - max((len(s) for s in stop), default=0)), end + 1):
        if any(s.startswith(text[start:end]) and end - start < len(s) for s in stop if s):
            return len(text) - start
    return len(text) - end


def run(chunks: list[bytes], stop) -> tuple[list[str], TextAssembler]:
    """Feed the tokens, checking the stream invariants after every push; returns the pieces and the assembler."""
    asm = TextAssembler(_Chunks(chunks), stop)
    result, stopped = expected(chunks, stop)
    pieces, streamed = [], ""
    for i in range(len(chunks)):
        piece = asm.push(i)
        pieces.append(piece)
        streamed += piece
        assert result.startswith(streamed), f"streamed {streamed!r}, but the result is {result!r}"
        if asm.stopped:
            break
        text = asm.tokenizer.decode(range(i + 1))
        assert len(text) - len(streamed) == _held_back(text, stop), (text, streamed)
    pieces.append(asm.finish())
    assert asm.stopped == stopped and asm.text == result
    assert "".join(pieces) == result
    return pieces, asm


# ------------------------------------------------------------------------------------- fixed cases
@pytest.mark.parametrize("text, stop, result", [
    ("xaab", ["aab"], "x"),  # "aa" held back (the longest match), not just "a"
    ("xaaab", ["aab"], "xa"),
    ("xaaaaab!", ["aab"], "xaaa"),
    ("a\n\nb\n\n\nc", ["\n\n\n"], "a\n\nb"),
    ("\n\n\n\n", ["\n\n\n"], ""),
    ("ab\n\n", ["\n\n\n"], "ab\n\n"),  # a prefix left at the end is released by finish()
    ("abab abc", ["abc"], "abab "),
    ("ababac", ["abac"], "ab"),
])
def test_self_overlapping_stops(text, stop, result):
    pieces, asm = run(_split(text), stop)
    assert asm.text == result


def test_the_holdback_keeps_the_longest_matching_prefix():
    asm = TextAssembler(_Chunks(_split("xaab")), ["aab"])
    assert [asm.push(0), asm.push(1), asm.push(2)] == ["x", "", ""]  # "aa" could still become "aab"
    assert asm.push(3) == "" and asm.stopped and asm.text == "x"


@pytest.mark.parametrize("cuts", [[5, 7], [4, 6], [6], [1, 2, 3, 4, 5, 6, 7, 8], [8]])
def test_stop_split_across_tokens(cuts):
    text = "abc STOP def"  # STOP is bytes 4..8
    pieces, asm = run(_split(text, cuts), ["STOP"])
    assert asm.text == "abc " and asm.stopped


def test_stop_split_across_stream_pieces():
    """The first part of the stop string is held back while it is still only a prefix."""
    chunks = [b"one S", b"T", b"O", b"P two"]
    asm = TextAssembler(_Chunks(chunks), ["STOP"])
    assert asm.push(0) == "one "
    assert asm.push(1) == asm.push(2) == ""
    assert asm.push(3) == "" and asm.text == "one "


def test_a_near_miss_is_released():
    pieces, asm = run(_split("STOSTOP"), ["STOP"])
    assert asm.text == "STO"
    pieces, asm = run([b"ST", b"OX", b"!"], ["STOP"])
    assert not asm.stopped and pieces == ["", "STOX", "!", ""]


@pytest.mark.parametrize("text, stop, result", [
    ("one END two\n\nthree", ["\n\n", "END"], "one "),
    ("one\n\ntwo END", ["END", "\n\n"], "one"),
    ("xabc", ["abc", "ab"], "x"),  # "ab" completes first
    ("xabcd", ["abcd", "bc"], "xa"),  # "bc" completes first, though "abcd" would start earlier
    ("xbcd", ["abcd", "bcd"], "x"),
    ("aaa", ["aaaa", "b"], "aaa"),
])
def test_several_stops(text, stop, result):
    pieces, asm = run(_split(text), stop)
    assert asm.text == result


@pytest.mark.parametrize("chunks, stop, result", [
    ([b"x", b"abcd"], ["bc", "abcd"], "x"),  # one token completes both: the earliest start cuts
    ([b"one ", b"END\n\n"], ["\n\n", "END"], "one "),
    ([b"xab", b"cab"], ["bca", "abc"], "x"),
])
def test_one_token_completes_several_stops(chunks, stop, result):
    pieces, asm = run(chunks, stop)
    assert asm.text == result


@pytest.mark.parametrize("text, stop, result", [
    ("hello 你好 world", ["你好"], "hello "),
    ("café! ok", ["é!"], "caf"),
    ("ok 🤗🚀 no", ["🚀"], "ok 🤗"),
    ("x é y", ["é!"], "x é y"),  # starts like the stop, then differs
    ("aé", ["é"], "a"),
    ("日本語の本", ["本"], "日"),
])
@pytest.mark.parametrize("cuts", [None, "chars", [1]])
def test_multibyte_stops(text, stop, result, cuts):
    if cuts == "chars":  # one token per character
        cuts = [len(text[:i].encode()) for i in range(len(text))]
    pieces, asm = run(_split(text, cuts), stop)
    assert asm.text == result
    assert all("\ufffd" not in p for p in pieces)


def test_streaming_holds_back_split_utf8():
    text = "héllo 你好 🤗👩‍👩‍👧 ok"
    pieces, asm = run(_split(text), [])
    assert all("\ufffd" not in p for p in pieces)
    assert len([p for p in pieces if p]) > 5  # really incremental


def test_nothing_after_the_stop():
    asm = TextAssembler(_Chunks([b"a", b"STOP", b"b"]), ["STOP"])
    assert asm.push(0) == "a" and asm.push(1) == "" and asm.stopped
    assert asm.push(2) == "" and asm.finish() == "" and asm.text == "a"


def test_empty_stop_strings_are_ignored():
    pieces, asm = run(_split("abc"), ["", "c"])
    assert asm.text == "ab"


# ------------------------------------------------------------------------------------- property
_ALPHABET = ["a", "b", "\n", "x", "é", "你", "🤗"]


@st.composite
def _streams(draw):
    text = "".join(draw(st.lists(st.sampled_from(_ALPHABET), max_size=24)))
    n_stops = draw(st.integers(0, 3))
    stops = []
    for _ in range(n_stops):
        if text and draw(st.booleans()):  # often a piece of the text itself, so that it stops
            i = draw(st.integers(0, len(text) - 1))
            stops.append(text[i : i + draw(st.integers(1, 4))])
        else:
            stops.append("".join(draw(st.lists(st.sampled_from(_ALPHABET), min_size=1, max_size=4))))
    n = len(text.encode())
    cuts = draw(st.lists(st.integers(1, max(1, n - 1)), max_size=n)) if n > 1 else []
    return _split(text, cuts), stops


@settings(derandomize=True, database=None, max_examples=400, deadline=None)
@given(case=_streams())
@example(case=(_split("xaab"), ["aab"]))
@example(case=(_split("xaaab"), ["aab"]))
@example(case=(_split("a\n\n\n"), ["\n\n\n"]))
@example(case=([b"a\n", b"\n", b"\nb"], ["\n\n\n"]))
@example(case=(_split("xé你🤗"), ["你🤗", "é你x"]))
@example(case=(_split("ab", [1]), ["b", "ab"]))
def test_stream_joins_to_the_result_and_never_leaks_a_stop(case):
    chunks, stops = case
    pieces, asm = run(chunks, stops)
    if asm.stopped:
        full = _Chunks(chunks).decode(range(len(chunks)))
        assert full.startswith(asm.text) and any(full[len(asm.text):].startswith(s) for s in stops if s)


# ------------------------------------------------------------------------------------- through generate
def test_stop_across_stream_pieces_in_generate(tiny_models):
    """With the tiny BPE tokenizer: a stop string that starts inside one token and ends inside a later one."""
    lm = leanformers.load(str(tiny_models["llama3"]), dtype="float32", progress=False)
    prompt = "Once upon a time"
    free = lm.generate(prompt, max_new_tokens=24, ignore_eos=True)
    pieces = [lm.tokenizer.decode(free.token_ids[:i]) for i in range(len(free.token_ids) + 1)]
    ends = [len(p) for p in pieces]  # text length after each token
    start = next(i for i in range(1, len(free.text) - 4)  # a token ends inside the stop, none at its ends
                 if i not in ends and i + 4 not in ends and any(i < e < i + 4 for e in ends))
    stop = free.text[start : start + 4]
    first = free.text.find(stop)
    stream = lm.stream(prompt, max_new_tokens=24, ignore_eos=True, stop=[stop, "never seen"])
    streamed = list(stream)
    assert "".join(streamed) == stream.result.text == free.text[:first]
    assert stream.result.finish_reason == "stop" and len(stream.result.token_ids) < 24
