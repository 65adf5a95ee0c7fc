"""Reading the tool-call part of a reply as its text comes: `CallReader` is fed text deltas and
gives back `CallPiece`s, each call's name once its string is closed, then its arguments' JSON
text piece by piece as the model writes it (as vLLM and OpenAI stream them).

A format is a generator function `read(reader)` written as if the whole text were there: its
steps (`peek`, `literal`, `until`, `value`, `call_object`, `call_list`) yield when they need more
text, so a feed runs it as far as the text allows and no further. Nothing is sent that more text
could change: a name goes out once its string is closed, and the arguments are the raw text the
model wrote, so the pieces of a call join to exactly what the whole reply's parse reports.

Arguments written before the name, or as a JSON string holding the object ("some models write the
arguments as JSON text"), go out whole once both are known."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Generator
from typing import NamedTuple

ARGUMENT_KEYS = ("arguments", "parameters")  # llama3 writes "parameters"
_SCALAR = re.compile(r"[\w.+-]*")  # a number, true, false or null

Steps = Generator[None, None, object]


class Malformed(ValueError):
    """The text is not a tool call of the format."""


class ParsedCall(NamedTuple):
    name: str
    arguments: str  # JSON text of an object


class CallPiece(NamedTuple):
    index: int  # which call of the reply
    name: str | None  # on the call's first piece only
    arguments: str  # the next piece of its arguments' JSON text ("" with the name alone)


class CallReader:
    """One reply's tool-call part, fed as it comes. A feed returns the pieces it made certain;
    `valid` says, after `finish`, whether the whole text read as calls of the format."""

    def __init__(self, read: Callable[[CallReader], Steps]) -> None:
        self.text = ""
        self.pos = 0  # how far the format has read `text`
        self.ended = False
        self.failed = False
        self.done = False
        self.calls: list[ParsedCall] = []  # the arguments of the last one may still grow
        self._pieces: list[CallPiece] = []
        self._steps = read(self)

    def feed(self, delta: str) -> list[CallPiece]:
        self.text += delta
        return self._run()

    def finish(self) -> list[CallPiece]:
        self.ended = True
        return self._run()

    @property
    def valid(self) -> bool:
        return self.done and bool(self.calls)

    def _run(self) -> list[CallPiece]:
        if not (self.done or self.failed):
            try:
                next(self._steps)
            except StopIteration:
                self.done = True
            except ValueError:  # Malformed, or json.JSONDecodeError on a value
                self.failed = True
        pieces, self._pieces = self._pieces, []
        merged: list[CallPiece] = []  # one piece per call and feed
        for piece in pieces:
            if merged and merged[-1].index == piece.index:
                last = merged[-1]
                piece = last._replace(arguments=last.arguments + piece.arguments)
                merged.pop()
            merged.append(piece)
        return merged

    # --- what the formats emit ---------------------------------------------------------------

    def start_call(self, name: str) -> None:
        self.calls.append(ParsedCall(name, ""))
        self._pieces.append(CallPiece(len(self.calls) - 1, name, ""))

    def send(self, arguments: str) -> None:
        """The next piece of the last started call's arguments."""
        last = self.calls[-1]
        self.calls[-1] = last._replace(arguments=last.arguments + arguments)
        self._pieces.append(CallPiece(len(self.calls) - 1, None, arguments))

    # --- the steps the formats are written in ------------------------------------------------

    def more(self) -> Steps:
        if self.ended:
            raise Malformed("the text ends inside a tool call")
        yield

    def peek(self, end_ok: bool = False) -> Generator[None, None, str | None]:
        """The next character after white space; None at the end of the text when `end_ok`."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos].isspace():
                self.pos += 1
            if self.pos < len(self.text):
                return self.text[self.pos]
            if end_ok and self.ended:
                return None
            yield from self.more()

    def literal(self, word: str) -> Steps:
        """Past `word`, after white space."""
        yield from self.peek()
        while len(self.text) - self.pos < len(word) and word.startswith(self.text[self.pos :]):
            yield from self.more()
        if not self.text.startswith(word, self.pos):
            raise Malformed(f"expected {word!r}")
        self.pos += len(word)

    def until(self, word: str, end_ok: bool = False) -> Generator[None, None, str | None]:
        """The text before the next `word`, reading past it; None when the text ends first and
        `end_ok`."""
        while (at := self.text.find(word, self.pos)) < 0:
            if end_ok and self.ended:
                return None
            yield from self.more()
        before = self.text[self.pos : at]
        self.pos = at + len(word)
        return before

    def value(self, on_piece: Callable[[str], None] | None = None) -> Generator[None, None, str]:
        """One JSON value's text; `on_piece` gets an object's or a string's text as it comes."""
        first = yield from self.peek()
        start = self.pos
        if first not in '{["':
            while (end := _SCALAR.match(self.text, self.pos).end()) == len(self.text):
                if self.ended:
                    break
                yield from self.more()
            self.pos = end
        else:
            depth, in_string, escaped, sent = 0, False, False, start
            while True:
                while self.pos < len(self.text) and not (
                    self.pos > start and depth == 0 and not in_string
                ):
                    c = self.text[self.pos]
                    self.pos += 1
                    if escaped:
                        escaped = False
                    elif in_string:
                        escaped = c == "\\"
                        in_string = c != '"'
                    elif c == '"':
                        in_string = True
                    elif c in "{[":
                        depth += 1
                    elif c in "}]":
                        depth -= 1
                if on_piece is not None and self.pos > sent:
                    on_piece(self.text[sent : self.pos])
                    sent = self.pos
                if depth == 0 and not in_string:
                    break
                yield from self.more()
        text = self.text[start : self.pos]
        json.loads(text)  # JSONDecodeError: not a value
        return text

    def string(self) -> Generator[None, None, str]:
        if (yield from self.peek()) != '"':
            raise Malformed("expected a string")
        return json.loads((yield from self.value()))

    def arguments(self, send: bool) -> Steps:
        """A call's arguments: an object, or a string holding one; sent (as they come, when an
        object) if `send`. Returns their JSON text."""
        streams = send and (yield from self.peek()) == "{"
        text = yield from self.value(self.send if streams else None)
        value = json.loads(text)
        if isinstance(value, str):
            text, value = value, json.loads(value)
        if not isinstance(value, dict):
            raise Malformed("tool call arguments must be an object")
        if send and not streams:
            self.send(text)
        return text

    def call_object(self) -> Steps:
        """One `{"name": ..., "arguments": {...}}`; other members are read and left out."""
        yield from self.literal("{")
        name = arguments = None
        while True:
            key = yield from self.string()
            yield from self.literal(":")
            if key == "name" and name is None:
                name = yield from self.string()
                self.start_call(name)
                if arguments is not None:
                    self.send(arguments)
            elif key in ARGUMENT_KEYS and arguments is None:
                arguments = yield from self.arguments(send=name is not None)
            else:
                yield from self.value()
            if (yield from self.peek()) == "}":
                break
            yield from self.literal(",")
        self.pos += 1
        if name is None:
            raise Malformed("a tool call without a name")
        if arguments is None:
            self.send("{}")

    def call_list(self) -> Steps:
        """`[call, call, ...]`, one call at least."""
        yield from self.literal("[")
        while True:
            yield from self.call_object()
            if (yield from self.peek()) == "]":
                self.pos += 1
                return
            yield from self.literal(",")


def read_calls(read: Callable[[CallReader], Steps], text: str) -> list[ParsedCall] | None:
    """The calls of a whole tool-call part, or None when it does not read as calls."""
    reader = CallReader(read)
    reader.feed(text)
    reader.finish()
    return reader.calls if reader.valid else None
