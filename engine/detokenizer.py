"""Incremental detokenization: output token ids in, streamed text deltas out, with stop strings.

One `IncrementalDetokenizer` per request. Each `push` of one or more new output tokens returns the
text that is now safe to show; no text once returned is ever taken back. Two things hold text back:

1. The tokens' text itself may not be final yet (`_TextStream`): an incomplete UTF-8 character (a
   byte-level BPE token that carries half an emoji), or a run of SentencePiece byte-fallback
   tokens (`<0xF0>`...), which the tokenizer's decoder renders as characters only if the whole
   run is valid UTF-8 and as one U+FFFD per byte otherwise.
2. The end of the text may be the beginning of a stop string (at most len(longest stop) - 1
   characters), so it is shown only once the following text rules the stop string out.

Why a hand-written window and not `tokenizers.decoders.DecodeStream` (tokenizers 0.23): it does
the same prefix/read-offset walk in Rust, and can be primed with the prompt (`ids=`), but
  - it has no flush: tokens still pending at the end (half a character) are lost, so the
    streamed text is not `decode(output_ids)` when a request ends mid-character;
  - with byte-fallback tokenizers it streams a valid byte run's characters at once, and raises
    "Invalid prefix encountered" when a later byte token makes the run invalid UTF-8 (the full
    decode then turns the already streamed characters into U+FFFD): that text cannot be taken
    back, so the stream would diverge from `decode(output_ids)`;
  - primed with the whole prompt, its first step decodes the whole prompt, and a run of skipped
    special tokens grows its window without bound.
The window below is vLLM's prefix/read-offset method, in token-id space, through the tokenizer's
own `decode` (so every decoder, byte-level, Metaspace, byte fallback, Strip, behaves exactly as in
`tokenizer.decode`), plus a flush and the byte-fallback rule.

The text of the output is `decode(prompt + output) - decode(prompt)`: with a prompt, the first
output token keeps its SentencePiece leading space ("▁world" -> " world"); with an empty prompt
(or one made only of skipped special tokens) it is `decode(output)`, which drops it, as
`tokenizer.decode` does. `clean_up_tokenization_spaces` (a WordPiece-era post-process that
transformers already skips for BPE) is not applied.
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from engine.config import SamplingParams

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded as left context of the output: one is enough for the decoders in use
# (only the window's first token is treated differently); a few more cost nothing.
_PROMPT_CONTEXT_TOKENS = 4
# A UTF-8 character is at most 4 bytes and every token carries at least one byte of it.
_MAX_CHAR_TOKENS = 4
# Tokens held without any new text before the window gives up waiting, so that the cost of a
# push stays bounded even on a long run of invalid bytes. A valid byte-fallback run longer than
# this is shown at its character boundaries instead of when the run ends; exactness against
# `decode` is then lost only if that run later turns out to be invalid UTF-8.
_MAX_PENDING_TOKENS = 16
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class DetokenizerUpdate(NamedTuple):
    delta: str  # new text safe to show now
    stop_string: str | None  # the stop string that matched, when one did (the request must finish)


class _TokenizerInfo(NamedTuple):
    special_ids: frozenset[int]  # ids that decode(..., skip_special_tokens=True) drops
    byte_fallback: bool  # the decoder turns <0xNN> tokens into bytes (Llama 2, Mistral v0.1)


# Per-tokenizer facts, computed once: walking the added tokens and the decoder per request would
# cost more than the request's detokenization.
_INFO_CACHE: weakref.WeakKeyDictionary[Tokenizer, _TokenizerInfo] = weakref.WeakKeyDictionary()


def _tokenizer_info(backend: Tokenizer) -> _TokenizerInfo:
    info = _INFO_CACHE.get(backend)
    if info is None:
        special = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        )
        decoder = backend.decoder
        byte_fallback = decoder is not None and _has_byte_fallback(
            json.loads(decoder.__getstate__())
        )
        info = _TokenizerInfo(special, byte_fallback)
        _INFO_CACHE[backend] = info
    return info


def _is_byte_token(backend: Tokenizer, info: _TokenizerInfo, token_id: int) -> bool:
    """Whether the decoder reads this token as one raw byte (`<0xNN>` under ByteFallback)."""
    if not info.byte_fallback:
        return False
    token = backend.id_to_token(token_id)
    return token is not None and _BYTE_TOKEN.fullmatch(token) is not None


def _has_byte_fallback(node: Any) -> bool:
    """Whether a decoder's JSON (possibly a Sequence of decoders) contains ByteFallback."""
    if isinstance(node, dict):
        return node.get("type") == "ByteFallback" or any(
            _has_byte_fallback(v) for v in node.values()
        )
    if isinstance(node, list):
        return any(_has_byte_fallback(v) for v in node)
    return False


class _TextStream:
    """Token ids -> final text, a few tokens at a time, through the tokenizer's own decoder.

    Invariant: `_ids[:_read]` are context tokens whose text was already returned (or belongs to
    the prompt) and `_prefix_text == decode(_ids[:_read])`; then `decode(_ids)[len(_prefix_text):]`
    is the text of `_ids[_read:]` exactly as in a decode of the whole sequence. That holds because
    the decoders differ on a window only at its first token (Metaspace and Strip drop its leading
    space), which both decodes share, and because a window only ever starts at a boundary where
    the text before it was final (see `_is_final`). The window is the last returned tokens plus
    the pending ones, so a push costs O(tokens pushed), not O(output).
    """

    def __init__(
        self,
        backend: Tokenizer,
        info: _TokenizerInfo,
        context_ids: list[int],
        skip_special_tokens: bool,
    ) -> None:
        self._backend = backend
        self._info = info
        self._skip_special_tokens = skip_special_tokens
        self._ids = context_ids
        self._read = len(context_ids)
        self._prefix_text = self._decode(context_ids)

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def push(self, token_ids: Sequence[int]) -> str:
        """The text that `token_ids` make final; "" while it may still change."""
        self._ids.extend(token_ids)
        n = len(self._ids)
        if n == self._read:
            return ""
        text = self._decode(self._ids)
        pending = n - self._read
        # Past the bound, a byte-fallback run is let out at its character boundaries, and, once
        # it was (the context then ends inside the run), at each of them until the run ends.
        in_run_ok = pending > _MAX_PENDING_TOKENS or (
            self._read > 0 and _is_byte_token(self._backend, self._info, self._ids[self._read - 1])
        )
        # Newest boundary first, back to the first one this push made: older boundaries failed
        # the same test when they were the newest, and would fail it again.
        for cut in range(n, max(self._read, n - len(token_ids)), -1):
            cut_text = text if cut == n else self._decode(self._ids[:cut])
            if self._is_final(cut, cut_text, text, in_run_ok):
                return self._advance(cut, cut_text)
        if pending >= _MAX_PENDING_TOKENS + _MAX_CHAR_TOKENS:
            # No character completes in this many tokens: invalid bytes. Stop waiting, so that
            # a push stays O(bound); the U+FFFD shown may differ from `decode` in this case.
            return self._advance(n, text)
        return ""

    def extend(self, token_ids: Iterable[int]) -> None:
        """Add tokens without decoding them, for one `flush` to decode them all."""
        self._ids.extend(token_ids)

    def flush(self) -> str:
        """All pending text, final or not (an incomplete character decodes to U+FFFD here, as in
        `decode`)."""
        if len(self._ids) == self._read:
            return ""
        return self._advance(len(self._ids), self._decode(self._ids))

    def _is_final(self, cut: int, cut_text: str, text: str, in_run_ok: bool) -> bool:
        """Whether `cut_text == decode(_ids[:cut])` can no longer change as tokens follow."""
        if not (cut_text.startswith(self._prefix_text) and text.startswith(cut_text)):
            return False  # the decoder rewrote earlier text: it is not settled yet
        if cut_text.endswith(_REPLACEMENT_CHAR):
            return False  # half a character: the following bytes may complete it
        # A byte-fallback run is rendered all at once: a run valid so far still turns into one
        # U+FFFD per byte if a later byte token makes it invalid, so its text is final only
        # once a non-byte token ends the run.
        return in_run_ok or not _is_byte_token(self._backend, self._info, self._ids[cut - 1])

    def _advance(self, cut: int, cut_text: str) -> str:
        delta = cut_text[len(self._prefix_text) :]
        # The tokens just returned become the next window's left context.
        del self._ids[: self._read]
        self._read = cut - self._read
        self._prefix_text = self._decode(self._ids[: self._read])
        return delta


def _prompt_context(
    backend: Tokenizer,
    info: _TokenizerInfo,
    prompt_token_ids: Sequence[int],
    skip_special_tokens: bool,
) -> list[int]:
    """The last few prompt tokens, as the output's left context; O(context), not O(prompt).

    The context must end on a complete character: prompt tokens after the last one are left out,
    so that output bytes continuing a prompt character decode as U+FFFD, as in
    `decode(output_ids)` (the text of a character split across prompt and output has no
    well-defined output part)."""
    skipped = info.special_ids if skip_special_tokens else frozenset()
    context: list[int] = []  # reversed
    for token_id in reversed(prompt_token_ids):
        if token_id in skipped:
            continue
        # A trailing byte-fallback run of the prompt would merge with output bytes.
        if not context and _is_byte_token(backend, info, token_id):
            continue
        context.append(token_id)
        if len(context) == _PROMPT_CONTEXT_TOKENS + _MAX_CHAR_TOKENS - 1:
            break
    context.reverse()
    # A prompt that ends in half a character (byte-level BPE): drop up to 3 tokens that carry it.
    for _ in range(_MAX_CHAR_TOKENS - 1):
        if not context:
            break
        if not backend.decode(context, skip_special_tokens=skip_special_tokens).endswith(
            _REPLACEMENT_CHAR
        ):
            break
        context.pop()
    return context[-_PROMPT_CONTEXT_TOKENS:]


def _find_stop(text: str, min_end: int, stops: Sequence[str]) -> tuple[int, str] | None:
    """The stop string match in `text` that ends first, among those ending after `min_end`.

    Earliest end, not earliest start: that is the match a character-by-character stream meets
    first, so the result does not depend on how many tokens each push brings. Among matches
    ending at the same place the longest (earliest start) wins, so no part of it shows."""
    best: tuple[int, int, str] | None = None  # (end, start, stop)
    for stop in stops:
        start = text.find(stop, max(0, min_end - len(stop) + 1))
        if start < 0:
            continue
        candidate = (start + len(stop), start, stop)
        if best is None or candidate[:2] < best[:2]:
            best = candidate
    return None if best is None else (best[1], best[2])


def _partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string:
    exactly the text a later push could still turn into a match."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class IncrementalDetokenizer:
    """Streams one request's output text; see the module docstring for what is held back.

    Invariants: `"".join(deltas) + flush() == output_text`; without a stop string match that is
    `decode(prompt + output) - decode(prompt)`, i.e. `tokenizer.decode(output_ids,
    skip_special_tokens=...)` up to the first output token's leading space (module docstring).
    With stop strings, `output_text` ends exactly before the first stop string (or right after
    it with `include_stop_str_in_output`). Like EOS, a stop string counts only from output token
    `min_tokens + 1` on.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
    ) -> None:
        backend: Tokenizer = tokenizer.backend_tokenizer
        info = _tokenizer_info(backend)
        skip = params.skip_special_tokens
        # Skipped special tokens contribute no text; dropping them before the window (as
        # `decode` itself does) keeps them from growing it and from being a window's first token.
        self._skipped_ids = info.special_ids if skip else frozenset()
        context = _prompt_context(backend, info, prompt_token_ids, skip)
        self._stream = _TextStream(backend, info, context, skip)
        self._stops = tuple(params.stop)
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        self._parts: list[str] = []  # released text; joined lazily by `output_text`
        self._held = ""  # decoded text that may begin a stop string, not released yet
        self._num_tokens = 0
        self._stop_string: str | None = None
        self._finished = False

    @property
    def num_tokens(self) -> int:
        """Output tokens pushed so far (skipped special tokens included)."""
        return self._num_tokens

    @property
    def output_text(self) -> str:
        """All output text so far: the released text plus the text held back as a possible stop
        string start (not the tokens still pending as half a character). Final, and cut at the
        stop string, once stopped or flushed."""
        if len(self._parts) != 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] + self._held

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the output, if one did (also when found by `flush`)."""
        return self._stop_string

    @property
    def finished(self) -> bool:
        return self._finished

    def push(self, new_token_ids: Sequence[int]) -> DetokenizerUpdate:
        """Add one or more output tokens (several under speculative decoding)."""
        if self._finished:
            raise RuntimeError(
                f"push after the output finished (stop string {self._stop_string!r})"
                if self._stop_string is not None
                else "push after flush(): the output is finished"
            )
        self._num_tokens += len(new_token_ids)
        kept = [t for t in new_token_ids if t not in self._skipped_ids]
        text = self._stream.push(kept) if kept else ""
        return self._release(text, final=False)

    def flush(self, unpushed_token_ids: Sequence[int] = ()) -> str:
        """At finish for a reason other than a stop string (EOS, length, abort): everything held
        back so far, and the text of `unpushed_token_ids`, output tokens never pushed (a request
        that reports only its final output hands them all over here, decoded in one go). Stop
        strings still apply to the text this releases. Later calls return ""."""
        if self._finished:
            return ""
        self._num_tokens += len(unpushed_token_ids)
        self._stream.extend(t for t in unpushed_token_ids if t not in self._skipped_ids)
        return self._release(self._stream.flush(), final=True).delta

    def _release(self, new_text: str, final: bool) -> DetokenizerUpdate:
        text = self._held + new_text
        if self._stops and self._num_tokens > self._min_tokens and new_text:
            # `_held` holds no match of its own (or one from before min_tokens, to be ignored),
            # so only matches that end in the new text count.
            match = _find_stop(text, len(self._held), self._stops)
            if match is not None:
                start, stop = match
                delta = text[: start + len(stop) if self._include_stop else start]
                self._parts.append(delta)
                self._held = ""
                self._stop_string = stop
                self._finished = True
                return DetokenizerUpdate(delta, stop)
        keep = 0 if final else _partial_stop_len(text, self._stops)
        delta = text[: len(text) - keep]
        self._held = text[len(text) - keep :]
        self._parts.append(delta)
        if final:
            self._finished = True
        return DetokenizerUpdate(delta, None)
