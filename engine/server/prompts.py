"""Prompts in, token ids out (completion prompts, chat messages through the chat template), and
token ids back to strings for logprobs.

The server keeps its own copy of the tokenizer: a Hugging Face fast tokenizer is not safe to
encode with from one thread while the engine thread decodes with it."""

from __future__ import annotations

import copy
from typing import Any

from engine.llm import render_chat
from engine.server.errors import bad_request
from engine.server.protocol import ChatMessageIn, CompletionRequest

# Logprobs can't be -inf in JSON; like vLLM, report impossible tokens at this floor.
LOGPROB_FLOOR = -9999.0


class Prompts:
    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = copy.deepcopy(tokenizer) if tokenizer is not None else None
        self.vocab_size = vocab_size
        self._token_text: dict[int, str] = {}

    def completion(self, req: CompletionRequest) -> list[list[int]]:
        """The request's prompts (one, or a batch) as token ids."""
        prompt = req.prompt
        if isinstance(prompt, str):
            batch: list[str | list[int]] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            batch = [list(prompt)]  # type: ignore[arg-type]
        else:
            batch = list(prompt)  # type: ignore[arg-type]
        if not batch:
            raise bad_request("the prompt is empty", param="prompt")
        return [self._ids(p) for p in batch]

    def _ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise bad_request("this model has no tokenizer: send token ids", param="prompt")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise bad_request("the prompt is empty", param="prompt")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise bad_request(
                f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                param="prompt",
            )
        return ids

    def chat(
        self, messages: list[ChatMessageIn], template_kwargs: dict[str, Any] | None
    ) -> list[int]:
        if not messages:
            raise bad_request("messages must not be empty", param="messages")
        rendered: list[dict[str, str]] = []
        for message in messages:
            content = message.content
            if isinstance(content, list):
                texts = []
                for part in content:
                    if part.type != "text" or part.text is None:
                        raise bad_request(
                            f"only text content parts are supported, got {part.type!r}",
                            param="messages",
                        )
                    texts.append(part.text)
                content = "".join(texts)
            entry = {"role": message.role, "content": content or ""}
            if message.name is not None:
                entry["name"] = message.name
            rendered.append(entry)
        try:
            ids = render_chat(self.tokenizer, rendered, **(template_kwargs or {}))
        except ValueError as exc:
            raise bad_request(str(exc), param="messages") from None
        except Exception as exc:  # a template can raise anything (jinja, TypeError on kwargs)
            raise bad_request(
                f"the chat template failed: {type(exc).__name__}: {exc}", param="messages"
            ) from None
        if not ids:
            raise bad_request("the rendered chat prompt is empty", param="messages")
        return ids

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""
            self._token_text[token_id] = text
        return text


def floor_logprob(value: float) -> float:
    return value if value > LOGPROB_FLOOR else LOGPROB_FLOOR  # NaN too
