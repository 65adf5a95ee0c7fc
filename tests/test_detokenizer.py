"""Incremental detokenization and stop strings, on tokenizers trained here (no downloads).

Three tokenizers, each trained in well under a second on a few hundred generated lines with
accents, CJK and emoji, and wrapped in `PreTrainedTokenizerFast`:
  - byte_bpe:  GPT-2 / Llama 3 / Qwen style byte-level BPE (emoji split over several tokens);
  - llama_spm: Llama 2 / Mistral style SentencePiece BPE: "▁" normalizer, byte-fallback tokens
               `<0xNN>` for characters outside the vocabulary, Replace+ByteFallback+Fuse+Strip
               decoder (the leading space is stripped once, at the start of the text);
  - unigram:   T5 style Unigram with the Metaspace pre-tokenizer and decoder.
The oracle is `tokenizer.decode` itself.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, NamedTuple

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from engine.config import SamplingParams
from engine.detokenizer import DetokenizerUpdate, IncrementalDetokenizer

WORDS = (
    "the a of to and in is it you that he was for on are with as his they be at one have this "
    "from or had by word but what some we can out other were all there when up use your how said "
    "quick brown fox jumps over lazy dog mat cat sat hello world again more done ok yes no "
    "café naïve façade résumé über straße jalapeño crème brûlée déjà vu niño año señor "
    "東京 日本語 中文 漢字 こんにちは 世界 ありがとう 한국어 안녕하세요 "
    "🙂 😀 🎉 👍🏽 🚀 ❤️ 👨‍👩‍👧 🇫🇷 ∑ ≈ € £ ¥ — … «quoted» “smart” hello, world! 42 3.14 "
    "a: b; (c) [d] {e} x=y 100% #tag @me ~tilde ^caret | pipe \\ back / slash ' \" ? ! "
).split()
SPECIALS = ["<unk>", "<s>", "</s>"]
ASCII = [chr(c) for c in range(32, 127)]


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(n)]


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        clean_up_tokenization_spaces=False,
    )
    hf.add_tokens(["<think>"])  # an added token that is not special: never skipped
    return hf


def build_byte_bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    return _wrap(tok)


def build_llama_spm() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # limit_alphabet leaves most non-ASCII characters out: they become byte-fallback tokens.
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, limit_alphabet=100, show_progress=False
    )
    tok.train_from_iterator(corpus(), trainer)
    # The trainer cannot add the 256 `<0xNN>` byte tokens as ordinary tokens (as special tokens
    # they would be skipped by decode), so add them to the trained model's vocabulary.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = json.loads(
        decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        ).__getstate__()
    )
    return _wrap(Tokenizer.from_str(json.dumps(spec)))


def build_unigram() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=600,
        special_tokens=SPECIALS,
        unk_token="<unk>",
        initial_alphabet=ASCII,
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    return _wrap(tok)


BUILDERS: dict[str, Callable[[], PreTrainedTokenizerFast]] = {
    "byte_bpe": build_byte_bpe,
    "llama_spm": build_llama_spm,
    "unigram": build_unigram,
}
_CACHE: dict[str, PreTrainedTokenizerFast] = {}


def get_tok(name: str) -> PreTrainedTokenizerFast:
    """Each tokenizer is trained once per test session."""
    if name not in _CACHE:
        _CACHE[name] = BUILDERS[name]()
    return _CACHE[name]


@pytest.fixture(params=sorted(BUILDERS))
def tok(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return get_tok(request.param)


def encode(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


@dataclass
class Run:
    updates: list[DetokenizerUpdate]
    flushed: str
    det: IncrementalDetokenizer

    @property
    def streamed(self) -> str:
        return "".join(u.delta for u in self.updates)


def stream(
    tok: PreTrainedTokenizerFast,
    ids: Sequence[int],
    params: SamplingParams | None = None,
    prompt: Sequence[int] = (),
    chunks: Callable[[], int] = lambda: 1,
) -> Run:
    """Push `ids` a few at a time (as many as `chunks()` says) until done or stopped; flush."""
    params = params or SamplingParams()
    det = IncrementalDetokenizer(tok, list(prompt), params)
    # Text held back as a possible stop string start: at most len(longest stop) - 1 characters.
    max_held = max(map(len, params.stop), default=1) - 1
    updates = []
    shown = ""
    i = 0
    while i < len(ids):
        k = chunks()
        updates.append(det.push(ids[i : i + k]))
        i += k
        shown += updates[-1].delta
        assert det.output_text.startswith(shown)
        assert len(det.output_text) - len(shown) <= max_held
        if updates[-1].stop_string is not None:
            break
    return Run(updates=updates, flushed=det.flush(), det=det)


def check_run(run: Run) -> str:
    """The invariants of every run; returns the final text."""
    assert run.streamed + run.flushed == run.det.output_text
    return run.det.output_text


# --- token text ---------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "keep"])
@pytest.mark.parametrize("chunking", ["one", "several"])
def test_random_sequences_match_decode(
    tok: PreTrainedTokenizerFast, skip: bool, chunking: str
) -> None:
    """Random ids (bytes that never form valid UTF-8, special and added tokens included)."""
    rng = random.Random(1234)
    chunks = (lambda: 1) if chunking == "one" else (lambda: rng.randint(1, 6))
    params = SamplingParams(skip_special_tokens=skip)
    for _ in range(200):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 60))]
        run = stream(tok, ids, params, chunks=chunks)
        assert check_run(run) == tok.decode(ids, skip_special_tokens=skip), ids
        assert run.det.num_tokens == len(ids)
        assert run.det.stop_string is None


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "keep"])
def test_flush_of_unpushed_tokens_equals_the_stream(
    tok: PreTrainedTokenizerFast, skip: bool
) -> None:
    """A request that reports only its final output pushes nothing and hands all of its tokens
    to `flush`: the same text as pushing them one by one, after a prompt or not."""
    rng = random.Random(77)
    params = SamplingParams(skip_special_tokens=skip)
    for line in corpus(60, seed=5):
        prompt = encode(tok, line) if rng.random() < 0.7 else []
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 50))]
        streamed = check_run(stream(tok, ids, params, prompt=prompt))
        det = IncrementalDetokenizer(tok, prompt, params)
        assert det.flush(ids) == det.output_text == streamed
        assert det.num_tokens == len(ids) and det.finished
        assert det.flush([1, 2]) == ""  # finished: nothing more


def test_real_text_never_streams_replacement_char(tok: PreTrainedTokenizerFast) -> None:
    for line in corpus(150, seed=7):
        ids = encode(tok, line)
        for chunking in (lambda: 1, lambda: 3):
            run = stream(tok, ids, chunks=chunking)
            assert check_run(run) == tok.decode(ids) == line.replace("<unk>", "")
            assert not any("\ufffd" in u.delta for u in run.updates)
            assert "\ufffd" not in run.flushed


def test_random_output_after_prompt_is_decode_difference(tok: PreTrainedTokenizerFast) -> None:
    """With a prompt: text == decode(prompt + output) - decode(prompt), BOS included or not."""
    rng = random.Random(99)
    bos = tok.bos_token_id
    for line in corpus(150, seed=3):
        prompt = encode(tok, line + " again")  # ends on a plain word
        if rng.random() < 0.5:
            prompt = [bos, *prompt]
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 40))]
        for skip in (True, False):
            full = tok.decode(prompt + ids, skip_special_tokens=skip)
            head = tok.decode(prompt, skip_special_tokens=skip)
            assert full.startswith(head)
            run = stream(tok, ids, SamplingParams(skip_special_tokens=skip), prompt=prompt)
            assert check_run(run) == full[len(head) :]


@pytest.mark.parametrize("name", ["llama_spm", "unigram"])
def test_sentencepiece_first_output_token_keeps_its_space(name: str) -> None:
    tok = get_tok(name)
    prompt = encode(tok, "hello")
    ids = encode(tok, "hello world again")
    assert ids[: len(prompt)] == prompt
    out = ids[len(prompt) :]
    assert tok.convert_ids_to_tokens(out[0]).startswith("▁")
    assert tok.decode(out) == "world again"  # decode alone drops the leading space ...
    run = stream(tok, out, prompt=[tok.bos_token_id, *prompt])
    assert check_run(run) == " world again"  # ... after a prompt it is kept
    assert run.updates[0].delta.startswith(" ")
    # Without a prompt the text is decode(output), leading space dropped, as decode does.
    assert check_run(stream(tok, out)) == "world again"
    # Skipped special tokens between prompt and output change nothing.
    eos = tok.eos_token_id
    assert check_run(stream(tok, [eos, eos, *out], prompt=prompt)) == " world again"


def test_emoji_split_across_byte_level_tokens() -> None:
    tok = get_tok("byte_bpe")
    ids = encode(tok, "ok 🦀 done")
    pieces = [tok.decode(ids[: j + 1]) for j in range(len(ids))]
    partial = [j for j, p in enumerate(pieces) if p.endswith("\ufffd")]
    assert partial, "the emoji must span several tokens for this test to mean anything"
    run = stream(tok, ids)
    deltas = [u.delta for u in run.updates]
    assert not any("\ufffd" in d for d in deltas)
    done = partial[-1] + 1  # the token that completes the emoji
    assert "🦀" in deltas[done] and "🦀" not in "".join(deltas[:done])
    assert check_run(run) == "ok 🦀 done"


def test_byte_fallback_character_shows_when_its_byte_run_ends() -> None:
    tok = get_tok("llama_spm")
    ids = encode(tok, "ok Жук done")
    tokens = tok.convert_ids_to_tokens(ids)
    byte_tokens = [j for j, t in enumerate(tokens) if t.startswith("<0x")]
    assert len(byte_tokens) >= 6  # the characters fell back to bytes
    first, run_end = byte_tokens[0], byte_tokens[-1] + 1
    run = stream(tok, ids)
    deltas = [u.delta for u in run.updates]
    # A valid byte run could still turn into U+FFFD with one more byte, so it is shown with the
    # first token after it, all at once.
    assert "".join(deltas[:run_end]) == tok.decode(ids[:first])
    assert "Жук" in deltas[run_end]
    assert check_run(run) == "ok Жук done"


def test_long_byte_fallback_run_streams_at_character_boundaries() -> None:
    """Past 16 pending byte tokens a valid run is let out character by character, so that
    neither latency nor the decode window grows with the run."""
    tok = get_tok("llama_spm")
    text = "ok " + "Жуки" * 10 + " done"
    ids = encode(tok, text)
    assert sum(t.startswith("<0x") for t in tok.convert_ids_to_tokens(ids)) == 80
    run = stream(tok, ids)
    deltas = [u.delta for u in run.updates]
    assert check_run(run) == text
    assert not any("\ufffd" in d for d in deltas)
    cyrillic = [j for j, d in enumerate(deltas) if set(d) & set("Жуки")]
    assert len(cyrillic) >= 30  # shown a character at a time after the first wait
    assert cyrillic[0] <= 20


@pytest.mark.parametrize("name", ["byte_bpe", "llama_spm"])
def test_flush_releases_incomplete_character_as_decode_does(name: str) -> None:
    tok = get_tok(name)
    ids = encode(tok, "ok 🦀")
    cut = ids[:-1]  # the emoji's last byte never comes
    expected = tok.decode(cut)
    assert expected.endswith("\ufffd")
    run = stream(tok, cut)
    assert "\ufffd" not in run.streamed
    assert run.flushed.endswith("\ufffd")
    assert check_run(run) == expected
    assert run.det.flush() == ""  # flush is final


@pytest.mark.parametrize("name", ["byte_bpe", "llama_spm"])
def test_character_split_between_prompt_and_output(name: str) -> None:
    """The bytes of a character split by the prompt/output boundary decode as U+FFFD, as in
    decode(output_ids); no error, nothing taken back."""
    tok = get_tok(name)
    ids = encode(tok, "ok 🦀 done")
    split = next(j for j in range(len(ids)) if tok.decode(ids[: j + 1]).endswith("\ufffd")) + 1
    prompt, out = ids[:split], ids[split:]
    assert check_run(stream(tok, out, prompt=prompt)) == tok.decode(out)
    # A stray continuation byte after a prompt that ends on a complete character.
    stray = tok.convert_tokens_to_ids("<0x96>") if name == "llama_spm" else encode(tok, "Ж")[-1]
    out = [stray, *encode(tok, " done")]
    assert tok.decode(out).startswith("\ufffd")
    assert check_run(stream(tok, out, prompt=encode(tok, "ok Жук"))) == tok.decode(out)


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "keep"])
def test_special_tokens_skipped_or_kept(tok: PreTrainedTokenizerFast, skip: bool) -> None:
    bos, eos = tok.bos_token_id, tok.eos_token_id
    think = tok.convert_tokens_to_ids("<think>")
    ids = [bos, *encode(tok, "hello"), think, eos, eos, *encode(tok, " world"), eos]
    text = check_run(stream(tok, ids, SamplingParams(skip_special_tokens=skip)))
    assert text == tok.decode(ids, skip_special_tokens=skip)
    assert ("</s>" in text) is not skip
    assert "<think>" in text  # not a special token: never skipped


def test_cost_per_push_does_not_grow_with_length(tok: PreTrainedTokenizerFast) -> None:
    """Every decode call sees a bounded window, however long the prompt and the output."""
    lengths: list[int] = []

    class CountingBackend:
        def __init__(self, inner: Tokenizer) -> None:
            self.inner = inner

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            lengths.append(len(ids))
            return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    counting = SimpleNamespace(backend_tokenizer=CountingBackend(tok.backend_tokenizer))
    text = " ".join(corpus(200, seed=11))
    ids = encode(tok, text)
    assert len(ids) > 2000
    det = IncrementalDetokenizer(counting, ids, SamplingParams())  # type: ignore[arg-type]
    parts = [det.push([t]).delta for t in ids] + [det.flush()]
    assert "".join(parts) == tok.decode(ids + ids)[len(tok.decode(ids)) :]
    # The longest window: a pending byte-fallback run (<= 16 + 4 tokens) plus its context.
    assert max(lengths) <= 48
    assert len(lengths) <= 2 * len(ids) + 4  # at most two decodes per push


# --- stop strings -------------------------------------------------------------------------


class Piece(NamedTuple):
    offset: int  # in the text
    text: str
    num_tokens: int  # > 1 for tokens that end inside a character, grouped with the next ones


def pieces(tok: PreTrainedTokenizerFast, ids: list[int]) -> list[Piece]:
    """The text of each token of `ids`, in context."""
    out = []
    prev = ""
    start = 0
    for j in range(len(ids)):
        cur = tok.decode(ids[: j + 1])
        if not cur.endswith("\ufffd"):
            assert cur.startswith(prev)
            out.append(Piece(len(prev), cur[len(prev) :], j + 1 - start))
            prev, start = cur, j + 1
    return out


TEXT = "hello world, the quick brown fox said: déjà vu and more"


def pushes(rng: random.Random) -> list[Callable[[], int]]:
    return [lambda: 1, lambda: rng.randint(2, 5), lambda: 1000]


def assert_stops_at(
    tok: PreTrainedTokenizerFast,
    text: str,
    stops: list[str],
    expected: str,
    stop: str,
    include: bool = False,
) -> None:
    ids = encode(tok, text)
    params = SamplingParams(stop=stops, include_stop_str_in_output=include)
    for chunks in pushes(random.Random(0)):
        run = stream(tok, ids, params, chunks=chunks)
        assert check_run(run) == expected
        assert run.updates[-1].stop_string == stop == run.det.stop_string
        assert run.flushed == ""
        with pytest.raises(RuntimeError):
            run.det.push(ids[:1])


def test_stop_string_is_a_single_token(tok: PreTrainedTokenizerFast) -> None:
    singles = [p for p in pieces(tok, encode(tok, TEXT))[1:] if p.num_tokens == 1]
    offset, piece, _ = max(singles, key=lambda p: (len(p.text.strip()), -p.offset))
    assert len(piece.strip()) >= 3 and TEXT.find(piece) == offset
    assert_stops_at(tok, TEXT, [piece], TEXT[:offset], piece)
    assert_stops_at(tok, TEXT, [piece], TEXT[: offset + len(piece)], piece, include=True)


def test_stop_string_spans_tokens(tok: PreTrainedTokenizerFast) -> None:
    ps = pieces(tok, encode(tok, TEXT))
    # A stop string from the middle of one token to the middle of one three tokens later.
    a_off, b_off = next(
        (p.offset, q.offset)
        for p, q in zip(ps, ps[3:], strict=False)
        if len(p.text) >= 2 and len(q.text) >= 2
    )
    stop = TEXT[a_off + 1 : b_off + 1]
    assert TEXT.find(stop) == a_off + 1
    assert_stops_at(tok, TEXT, [stop], TEXT[: a_off + 1], stop)
    assert_stops_at(tok, TEXT, [stop], TEXT[: b_off + 1], stop, include=True)


def test_stop_string_inside_a_token(tok: PreTrainedTokenizerFast) -> None:
    singles = [p for p in pieces(tok, encode(tok, TEXT)) if p.num_tokens == 1]
    offset, piece, _ = max(singles, key=lambda p: (len(p.text), -p.offset))
    assert len(piece) >= 3
    stop = piece[1:-1]  # starts and ends inside the token
    start = TEXT.find(stop)
    assert start == offset + 1
    assert_stops_at(tok, TEXT, [stop], TEXT[:start], stop)
    assert_stops_at(tok, TEXT, [stop], TEXT[: start + len(stop)], stop, include=True)


def test_earliest_of_several_stop_strings_wins(tok: PreTrainedTokenizerFast) -> None:
    assert_stops_at(tok, TEXT, ["more", "fox", "brown"], "hello world, the quick ", "brown")
    # Earliest end wins (what a character-by-character stream meets first), whatever the
    # grouping of tokens into pushes: "lo w" ends before "hello world" does.
    assert_stops_at(tok, TEXT, ["hello world", "lo w"], "hel", "lo w")
    # Same end: the longer one, so that none of it shows.
    assert_stops_at(tok, TEXT, ["world", "o world"], "hell", "o world")


@pytest.mark.parametrize("name", ["byte_bpe", "llama_spm"])  # unigram: no multi-token chars
def test_stop_string_over_split_characters(name: str) -> None:
    tok = get_tok(name)
    text = "ok 🦀 done Жук end"
    assert any("\ufffd" in tok.decode(t) for t in encode(tok, text))
    assert_stops_at(tok, text, ["🦀"], "ok ", "🦀")
    assert_stops_at(tok, text, ["к e"], "ok 🦀 done Жу", "к e")
    assert_stops_at(tok, text, ["e Ж"], "ok 🦀 done Ж", "e Ж", include=True)
    assert_stops_at(tok, text, ["Ж", "🦀 d"], "ok ", "🦀 d")


def test_text_that_may_start_a_stop_string_is_held_until_flush(
    tok: PreTrainedTokenizerFast,
) -> None:
    text = "the cat sat on the mat"
    ids = encode(tok, text)
    params = SamplingParams(stop=["mat!", "xyz"])
    det = IncrementalDetokenizer(tok, [], params)
    shown = ""
    for j, t in enumerate(ids):
        update = det.push([t])
        assert update.stop_string is None
        shown += update.delta
        so_far = tok.decode(ids[: j + 1])
        assert so_far.startswith(shown)
        held = so_far[len(shown) :]
        # Held: exactly the longest end of the text that "mat!" could still start with.
        assert held == next((h for h in ("mat", "ma", "m") if so_far.endswith(h)), "")
        assert det.output_text == so_far
    assert shown == "the cat sat on the "
    assert det.flush() == "mat"
    assert det.output_text == text and det.stop_string is None
    with pytest.raises(RuntimeError):
        det.push(ids[:1])


def test_min_tokens_defers_stop_strings() -> None:
    tok = get_tok("byte_bpe")
    text = "ok yes ok yes ok"
    ids = encode(tok, text)
    first_yes_end = next(j for j in range(len(ids)) if "yes" in tok.decode(ids[: j + 1])) + 1
    params = SamplingParams(stop=["yes"], min_tokens=first_yes_end, max_tokens=100)
    run = stream(tok, ids, params)
    assert check_run(run) == "ok yes ok "
    assert run.det.stop_string == "yes"


def reference_stop(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Character-by-character reference: the first end where a stop string matches; the
    longest of those ending there."""
    for end in range(1, len(text) + 1):
        matched = [s for s in stops if text[:end].endswith(s)]
        if matched:
            stop = max(matched, key=len)
            return text[: end if include else end - len(stop)], stop
    return text, None


def test_random_stop_strings_match_reference(tok: PreTrainedTokenizerFast) -> None:
    rng = random.Random(5)
    for line in corpus(120, seed=21):
        text = tok.decode(encode(tok, line))
        ids = encode(tok, text)
        stops = []
        for _ in range(rng.randint(1, 3)):
            start = rng.randrange(len(text))
            stops.append(text[start : start + rng.randint(1, 6)])
        if rng.random() < 0.3:
            stops.append("never §")
        include = rng.random() < 0.5
        expected, stop = reference_stop(text, stops, include)
        params = SamplingParams(stop=stops, include_stop_str_in_output=include)
        for chunks in pushes(rng):
            # `stream` checks that nothing streamed is taken back and what is held at each step.
            run = stream(tok, ids, params, chunks=chunks)
            assert check_run(run) == expected, (text, stops)
            assert run.det.stop_string == stop
