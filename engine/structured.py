"""Grammar-constrained decoding through xgrammar.

A request's `StructuredSpec` (a JSON schema, any JSON object, a regex or an EBNF grammar) compiles
once per distinct spec (`GrammarBackend.compile`, cached) into a grammar; each request gets its own
matcher (`RequestGrammar`). Every step, `GrammarBackend.apply` has the matchers of the constrained
rows fill one packed bitmask [num_rows, ceil(vocab / 32)] int32 and applies it to the whole batch of
logits in place with xgrammar's own kernel; free rows in the same batch are left untouched.

Invariant the engine keeps: a matcher has accepted exactly the request's output tokens so far, so
`apply` is called once per step for the rows about to sample and `RequestGrammar.accept` once for
every token a row then takes.

JSON is generated compactly (`{"a": 1, "b": [2, 3]}`, no free whitespace): small models otherwise
tend to emit whitespace forever, and the output is the same JSON value either way. Compact JSON
never holds a raw control character, so JSON rows also mask every token with a byte below 0x20:
xgrammar 0.2's length-bounded strings (`maxLength`) would let them through, and strict parsers
reject them. Likewise every row masks UTF-16 surrogates written as UTF-8 (0xED then 0xA0-0xBF),
which xgrammar counts as one character but which detokenize to three U+FFFD.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from engine.numeric import cdiv

__all__ = ["GRAMMAR_KINDS", "GrammarBackend", "RequestGrammar", "StructuredSpec"]

GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "grammar")
COMPILE_CACHE_BYTES = 64 * 2**20
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: "; the rest is the reason.
_CPP_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")


@dataclass(frozen=True)
class StructuredSpec:
    """What a request's output must match. `value`: the JSON schema (as JSON text), the regex or
    the EBNF grammar (root rule `root`); empty for json_object."""

    kind: str
    value: str = ""

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise ValueError(f"structured kind must be one of {', '.join(GRAMMAR_KINDS)}")
        if not isinstance(self.value, str):
            raise ValueError("structured value must be a string")
        if self.kind != "json_object" and not self.value:
            raise ValueError(f"structured {self.kind} must not be empty")
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
            if not isinstance(schema, dict | bool):
                raise ValueError("a JSON schema must be an object or a boolean")

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool | str) -> StructuredSpec:
        text = schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True)
        return cls("json_schema", text)

    @classmethod
    def json_object(cls) -> StructuredSpec:
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> StructuredSpec:
        return cls("regex", pattern)

    @classmethod
    def grammar(cls, ebnf: str) -> StructuredSpec:
        return cls("grammar", ebnf)

    @classmethod
    def choice(cls, options: Sequence[str]) -> StructuredSpec:
        """Exactly one of `options`, as an EBNF alternation of string literals."""
        if not options or not all(isinstance(o, str) and o for o in options):
            raise ValueError("choice must be a non-empty list of non-empty strings")
        # JSON string escapes (\" \\ \n \t \uXXXX) are also EBNF string-literal escapes.
        return cls("grammar", "root ::= " + " | ".join(json.dumps(o) for o in options))


class RequestGrammar:
    """One request's matcher. `error` is set when the grammar could not go on."""

    def __init__(self, matcher: Any, is_json: bool, ends_ed: frozenset[int]) -> None:
        self.matcher = matcher
        self.is_json = is_json
        self.error: str | None = None
        self._ends_ed = ends_ed
        self.after_ed = False  # the last token ended with 0xED: no 0xA0-0xBF may follow

    def accept(self, token_id: int) -> bool:
        """Advance by the token the request took; True when the request must stop here: the
        grammar accepted a stop token (it is complete), or it is stuck (see `error`)."""
        if self.error is not None:
            return True
        if not self.matcher.accept_token(token_id):
            self.error = f"the grammar rejected token {token_id}"
            return True
        self.after_ed = token_id in self._ends_ed
        return bool(self.matcher.is_terminated())


class _TokenMasks(NamedTuple):
    """Fixed per-vocabulary masks, packed [words] int32 like xgrammar's bitmask rows."""

    keep: torch.Tensor  # every token but specials that are not stops, and inner surrogates
    keep_json: torch.Tensor  # keep, less the tokens holding a control byte
    stops: torch.Tensor  # only the stop tokens
    after_ed: torch.Tensor  # all, less the tokens that start with a byte in 0xA0-0xBF
    ends_ed: frozenset[int]  # tokens whose bytes end with 0xED


class GrammarBackend:
    """Compiles specs for one tokenizer and model vocabulary, and masks batches of logits.

    Thread-safe: the server compiles in worker threads (to warm the cache and reject a bad spec
    before it reaches the engine) while the engine thread builds matchers. xgrammar is imported
    on first use, so engines that never see a grammar never load it."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = [t for t in stop_token_ids if 0 <= t < vocab_size]
        self._lock = threading.Lock()
        self._compiler: Any = None
        self._masks: _TokenMasks | None = None
        self._bitmask: torch.Tensor | None = None  # [rows, words] int32, grown on demand

    def _xgr(self) -> Any:
        import xgrammar

        return xgrammar

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                if self.tokenizer is None:
                    raise ValueError("structured output needs a tokenizer; this model has none")
                if not self.stop_token_ids:
                    raise ValueError("structured output needs an end-of-sequence token")
                xgr = self._xgr()
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
                )
                self._compiler = xgr.GrammarCompiler(
                    info, max_threads=1, cache_limit_bytes=COMPILE_CACHE_BYTES
                )
                self._masks = self._fixed_masks(info)
            return self._compiler

    def compile(self, spec: StructuredSpec) -> Any:
        """-> xgrammar CompiledGrammar. Raises ValueError, with xgrammar's reason, for a spec
        that does not compile. Repeated specs are served from xgrammar's cache."""
        compiler = self._get_compiler()
        try:
            if spec.kind == "json_schema":
                return compiler.compile_json_schema(spec.value, any_whitespace=False)
            if spec.kind == "json_object":
                return compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=False, strict_mode=False
                )
            if spec.kind == "regex":
                return compiler.compile_regex(spec.value)
            return compiler.compile_grammar(spec.value)
        except (RuntimeError, ValueError, TypeError) as exc:
            reason = _CPP_PREFIX.sub("", str(exc).strip())
            raise ValueError(f"invalid {spec.kind.replace('_', ' ')}: {reason}") from None

    def matcher(self, spec: StructuredSpec) -> RequestGrammar:
        compiled = self.compile(spec)
        assert self._masks is not None
        is_json = spec.kind in ("json_schema", "json_object")
        return RequestGrammar(self._xgr().GrammarMatcher(compiled), is_json, self._masks.ends_ed)

    def apply(self, logits: torch.Tensor, grammars: Sequence[RequestGrammar | None]) -> None:
        """Mask, in place, the tokens each constrained row's grammar forbids next.

        logits: [num_rows, vocab]; grammars[i] is row i's matcher, None for a free row. A row
        whose grammar admits nothing (a schema no string satisfies) gets only the stop tokens,
        so it ends instead of failing the batch; its grammar's `error` says why."""
        rows = [i for i, g in enumerate(grammars) if g is not None]
        if not rows:
            return
        xgr = self._xgr()
        self._get_compiler()
        fixed = self._masks
        assert fixed is not None
        bitmask = self._rows(len(grammars))  # [num_rows, words] int32, CPU
        for i in rows:
            grammar = grammars[i]
            assert grammar is not None
            try:
                grammar.matcher.fill_next_token_bitmask(bitmask, i)
            except RuntimeError as exc:  # fail this row alone, never the batch
                bitmask[i] = 0
                grammar.error = _CPP_PREFIX.sub("", str(exc).strip())
        index = torch.tensor(rows, dtype=torch.long)
        constrained = [g for g in grammars if g is not None]
        keep = torch.stack(
            [fixed.keep_json if g.is_json else fixed.keep for g in constrained]
        )  # [len(rows), words]
        after_ed = [j for j, g in enumerate(constrained) if g.after_ed]
        if after_ed:
            keep[after_ed] &= fixed.after_ed
        masks = bitmask.index_select(0, index) & keep  # [len(rows), words]
        dead = (masks == 0).all(dim=-1)  # [len(rows)] bool
        if bool(dead.any()):
            masks[dead] = fixed.stops
            for i, is_dead in zip(rows, dead.tolist(), strict=True):
                grammar = grammars[i]
                if is_dead and grammar is not None and grammar.error is None:
                    grammar.error = "the grammar admits no further token"
        bitmask.index_copy_(0, index, masks)
        xgr.apply_token_bitmask_inplace(
            logits,
            bitmask.to(logits.device, non_blocking=True),
            vocab_size=self.vocab_size,
            indices=rows,
        )

    def _rows(self, num_rows: int) -> torch.Tensor:
        if self._bitmask is None or self._bitmask.shape[0] < num_rows:
            self._bitmask = self._xgr().allocate_token_bitmask(max(num_rows, 8), self.vocab_size)
        return self._bitmask[:num_rows]

    def _fixed_masks(self, info: Any) -> _TokenMasks:
        """Special tokens other than the stop tokens never match grammar text: the detokenizer
        drops them, so the text would no longer be what the grammar accepted."""
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        for token_id, added in (getattr(self.tokenizer, "added_tokens_decoder", {}) or {}).items():
            if getattr(added, "special", False):
                special.add(token_id)
        stops = set(self.stop_token_ids)
        vocab: list[bytes] = list(info.decoded_vocab)[: self.vocab_size]
        keep = torch.ones(self.vocab_size, dtype=torch.bool)
        inner_surrogate = re.compile(rb"\xed[\xa0-\xbf]")
        drop = [t for t in special - stops if 0 <= t < self.vocab_size]
        drop += [i for i, b in enumerate(vocab) if i not in stops and inner_surrogate.search(b)]
        keep[drop] = False
        keep_json = keep.clone()
        control = [i for i, b in enumerate(vocab) if b and min(b) < 0x20 and i not in stops]
        keep_json[control] = False
        only_stops = torch.zeros(self.vocab_size, dtype=torch.bool)
        only_stops[self.stop_token_ids] = True
        after_ed = torch.ones(self.vocab_size, dtype=torch.bool)
        after_ed[[i for i, b in enumerate(vocab) if b and 0xA0 <= b[0] <= 0xBF]] = False
        ends_ed = frozenset(i for i, b in enumerate(vocab) if b.endswith(b"\xed"))
        return _TokenMasks(
            _pack(keep), _pack(keep_json), _pack(only_stops), _pack(after_ed), ends_ed
        )


def _pack(bits: torch.Tensor) -> torch.Tensor:
    """[vocab] bool -> [ceil(vocab / 32)] int32, token 32 * w + b at bit b of word w (xgrammar's
    layout)."""
    words = cdiv(bits.numel(), 32)
    padded = torch.zeros(words * 32, dtype=torch.int64)
    padded[: bits.numel()] = bits.long()
    packed = (padded.view(words, 32) << torch.arange(32)).sum(dim=-1)  # [words] in [0, 2**32)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
