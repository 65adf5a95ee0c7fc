"""Tool-call parsers for `tool_choice: "auto"` (chosen with `--tool-call-parser`): the model's
text -> (content, tool calls). Each knows the marker that starts a call, so a stream can send
content until a call begins and hold back text that may be the start of one.

- hermes:  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, any number of them
           (Hermes 2 Pro, Qwen 2.5, the bundled model's template)
- llama3:  the reply is JSON, `{"name": ..., "parameters": {...}}`, several joined by `;`,
           optionally after `<|python_tag|>` (Llama 3.1+ JSON tool calling)
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or the v11 form
           `[TOOL_CALLS]name[ARGS]{...}` (one per marker)

Each format is read by one `CallReader` (engine/server/tool_call_reader.py), fed the whole reply
here and text deltas in a stream, so the streamed calls are the parsed ones. The arguments are
the JSON text the model wrote, not re-serialized. Text a parser cannot read as calls stays
content: a malformed call is never half-reported by `parse` (a stream may have sent the start of
a call the reply then breaks off).
"""

from __future__ import annotations

from typing import NamedTuple

from engine.server.tool_call_reader import CallReader, ParsedCall, Steps, read_calls


class Parsed(NamedTuple):
    content: str | None
    calls: list[ParsedCall]


class ToolParser:
    name = ""
    start = ""  # the text that begins the tool-call part of a reply
    needs_special_tokens = False  # the markers are special tokens: detokenize with them

    def read(self, reader: CallReader) -> Steps:
        """The format of the tool-call part (from `call_start` on), in `CallReader`'s steps."""
        raise NotImplementedError

    def reader(self) -> CallReader:
        return CallReader(self.read)

    def parse(self, text: str) -> Parsed:
        at = self.call_start(text)
        calls = None if at is None else read_calls(self.read, text[at:])
        if calls is None:
            return Parsed(text, [])
        return Parsed(text[:at].rstrip() or None, calls)

    def call_start(self, text: str) -> int | None:
        """Where the tool-call part of `text` begins, if it does."""
        at = text.find(self.start)
        return None if at < 0 else at

    def safe_end(self, text: str) -> int:
        """How much of `text` (with no call start in it) a stream may send as content now: all
        but a tail that more text could turn into the start of a call, and trailing
        whitespace (left out before a call, as `parse` leaves it out)."""
        held = next(
            (k for k in range(len(self.start) - 1, 0, -1) if text.endswith(self.start[:k])), 0
        )
        return len(text[: len(text) - held].rstrip())


class HermesParser(ToolParser):
    name = "hermes"
    start = "<tool_call>"

    def read(self, reader: CallReader) -> Steps:
        while (yield from reader.until(self.start, end_ok=True)) is not None:
            yield from reader.call_object()
            if (yield from reader.peek(end_ok=True)) is not None:  # the end tag may be cut off
                yield from reader.literal("</tool_call>")


class Llama3JsonParser(ToolParser):
    name = "llama3"
    start = "<|python_tag|>"
    needs_special_tokens = True

    def call_start(self, text: str) -> int | None:
        stripped = text.lstrip()
        if stripped.startswith((self.start, "{")):
            return len(text) - len(stripped)
        return None

    def safe_end(self, text: str) -> int:
        stripped = text.lstrip()
        # Only the reply's start can open a call: until it is known, send nothing.
        return 0 if not stripped or self.start.startswith(stripped) else len(text.rstrip())

    def read(self, reader: CallReader) -> Steps:
        if reader.text.startswith(self.start):  # `call_start` saw all of it
            yield from reader.literal(self.start)
        while True:
            yield from reader.call_object()
            if (yield from reader.peek(end_ok=True)) is None:
                return
            yield from reader.literal(";")
            if (yield from reader.peek(end_ok=True)) is None:
                return


class MistralParser(ToolParser):
    name = "mistral"
    start = "[TOOL_CALLS]"
    needs_special_tokens = True

    def read(self, reader: CallReader) -> Steps:
        while (yield from reader.until(self.start, end_ok=True)) is not None:
            if (yield from reader.peek()) == "[":
                yield from reader.call_list()
            else:  # v11: name[ARGS]{...}
                reader.start_call((yield from reader.until("[ARGS]")).strip())
                yield from reader.arguments(send=True)


PARSERS: dict[str, type[ToolParser]] = {
    cls.name: cls for cls in (HermesParser, Llama3JsonParser, MistralParser)
}


def make_parser(name: str) -> ToolParser:
    try:
        return PARSERS[name]()
    except KeyError:
        raise ValueError(
            f"unknown tool-call parser {name!r}; choose one of {', '.join(sorted(PARSERS))}"
        ) from None
