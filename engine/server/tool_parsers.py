"""Tool-call parsers for `tool_choice: "auto"` (chosen with `--tool-call-parser`): the model's
text -> (content, tool calls). Each knows the marker that starts a call, so a stream can send
content until a call begins and hold back text that may be the start of one.

- hermes:  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, any number of them
           (Hermes 2 Pro, Qwen 2.5, the bundled model's template)
- llama3:  the reply is JSON, `{"name": ..., "parameters": {...}}`, several joined by `;`,
           optionally after `<|python_tag|>` (Llama 3.1+ JSON tool calling)
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or the v11 form
           `[TOOL_CALLS]name[ARGS]{...}` (one per marker)

Text a parser cannot read as calls stays content: a malformed call is never half-reported.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple


class ParsedCall(NamedTuple):
    name: str
    arguments: str  # JSON text of an object


class Parsed(NamedTuple):
    content: str | None
    calls: list[ParsedCall]


def _call(obj: Any, argument_keys: tuple[str, ...] = ("arguments", "parameters")) -> ParsedCall:
    """A {"name", "arguments"} object -> ParsedCall; ValueError when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError("not a tool call")
    arguments: Any = {}
    for key in argument_keys:
        if key in obj:
            arguments = obj[key]
            break
    if isinstance(arguments, str):  # some models write the arguments as JSON text
        arguments = json.loads(arguments)
    if not isinstance(arguments, dict):
        raise ValueError("tool call arguments must be an object")
    return ParsedCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


class ToolParser:
    name = ""
    start = ""  # the text that begins the tool-call part of a reply
    needs_special_tokens = False  # the markers are special tokens: detokenize with them

    def parse(self, text: str) -> Parsed:
        raise NotImplementedError

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
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> Parsed:
        at = self.call_start(text)
        if at is None:
            return Parsed(text, [])
        try:
            calls = [_call(json.loads(body)) for body in self._CALL.findall(text[at:])]
        except ValueError:  # json.JSONDecodeError is a ValueError
            return Parsed(text, [])
        content = text[:at].rstrip()
        return Parsed(content or None, calls)


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

    def parse(self, text: str) -> Parsed:
        at = self.call_start(text)
        if at is None:
            return Parsed(text, [])
        body = text[at:].removeprefix(self.start).strip()
        decoder = json.JSONDecoder()
        calls = []
        try:
            while body:
                obj, end = decoder.raw_decode(body)
                calls.append(_call(obj, ("parameters", "arguments")))
                body = body[end:].strip().removeprefix(";").strip()
        except ValueError:
            return Parsed(text, [])
        return Parsed(None, calls)


class MistralParser(ToolParser):
    name = "mistral"
    start = "[TOOL_CALLS]"
    needs_special_tokens = True

    def parse(self, text: str) -> Parsed:
        at = self.call_start(text)
        if at is None:
            return Parsed(text, [])
        calls = []
        try:
            for part in text[at:].split(self.start)[1:]:
                part = part.strip()
                if part.startswith("["):  # a JSON list of calls
                    obj, _ = json.JSONDecoder().raw_decode(part)
                    if not isinstance(obj, list):
                        raise ValueError("not a list of calls")
                    calls.extend(_call(item) for item in obj)
                else:  # name[ARGS]{...}
                    name, sep, arguments = part.partition("[ARGS]")
                    if not sep:
                        raise ValueError("no [ARGS]")
                    obj, _ = json.JSONDecoder().raw_decode(arguments.strip())
                    calls.append(_call({"name": name.strip(), "arguments": obj}))
        except ValueError:
            return Parsed(text, [])
        content = text[:at].rstrip()
        return Parsed(content or None, calls)


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
