"""Request examples shown in the OpenAPI schema (and run first by schema-driven testers), and the
shape of one server-sent event."""

from __future__ import annotations

from typing import Any

# With OpenAPI 3.1, the schema of a text/event-stream response describes one event.
SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "description": "One server-sent event: `data` is a JSON chunk of the response (or an "
    '`{"error": ...}` object), and the last event\'s `data` is `[DONE]`.',
    "properties": {"data": {"type": "string"}},
    "required": ["data"],
}

PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def _example(summary: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"summary": summary, "value": value}


def completion_examples(model: str) -> dict[str, dict[str, Any]]:
    base = {"model": model, "prompt": "Once upon a time", "max_tokens": 16}
    return {
        "greedy": _example("Greedy completion", {**base, "temperature": 0}),
        "stream": _example(
            "Streamed, with usage",
            {**base, "stream": True, "stream_options": {"include_usage": True}},
        ),
        "sampled": _example(
            "Two seeded samples with logprobs",
            {**base, "temperature": 0.8, "top_p": 0.95, "n": 2, "seed": 7, "logprobs": 2},
        ),
        "regex": _example(
            "Output matching a regex (extension)",
            {**base, "guided_regex": "[0-9]{3}-[0-9]{4}"},
        ),
    }


def chat_examples(model: str) -> dict[str, dict[str, Any]]:
    messages = [{"role": "user", "content": "Say hello."}]
    base = {"model": model, "messages": messages, "max_tokens": 32}
    return {
        "chat": _example("Chat", {**base, "temperature": 0}),
        "stream": _example(
            "Streamed, with logprobs",
            {**base, "stream": True, "logprobs": True, "top_logprobs": 2},
        ),
        "json_schema": _example(
            "Structured output: a JSON schema",
            {
                **base,
                "max_tokens": 64,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "person", "schema": PERSON_SCHEMA},
                },
            },
        ),
        "json_stream": _example(
            "Streamed JSON object",
            {**base, "stream": True, "response_format": {"type": "json_object"}},
        ),
    }
