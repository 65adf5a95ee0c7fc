"""Prompts in, token ids out (completion prompts, chat messages through the chat template), and
token ids back to strings for logprobs.

Tokenizing and templating run on worker threads, never on the event loop: a 20 MB prompt takes
seconds to tokenize, and no other stream, nor /health, may wait for it (a fast tokenizer's batch
encode, which `encode` uses, releases the GIL). Each worker thread has its own copy of the
tokenizer, and so does the event loop (`token_text`): a Hugging Face fast tokenizer is not safe to
use from two threads at once, and the engine thread decodes with the engine's own."""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from tokenizers import Tokenizer

from engine.server.errors import bad_request, prompt_too_long
from engine.server.protocol import ChatMessageIn, CompletionRequest

# Logprobs can't be -inf in JSON; like vLLM, report impossible tokens at this floor.
LOGPROB_FLOOR = -9999.0
NUM_TOKENIZER_THREADS = 2
T = TypeVar("T")


# Normalizers can shrink text before it is split (NFKC maps a 3-byte fullwidth letter to one
# byte): the bound on a text's token count allows for that much.
SHRINK_MARGIN = 4


class Prompts:
    """Tokenizes within `max_model_len`: a text too long to fit is refused without being
    tokenized whole (see `encode`)."""

    def __init__(self, tokenizer: Any, vocab_size: int, max_model_len: int) -> None:
        # A private original to copy from: the engine thread uses the one passed in.
        self._source = copy.deepcopy(tokenizer) if tokenizer is not None else None
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_token_bytes = longest_token_bytes(self._source) if tokenizer is not None else 1
        self._token_text: dict[int, str] = {}
        self._decoder = copy.deepcopy(tokenizer) if tokenizer is not None else None
        self._local = threading.local()
        self._copy_lock = threading.Lock()
        self._workers = ThreadPoolExecutor(NUM_TOKENIZER_THREADS, thread_name_prefix="tokenize")

    @property
    def has_tokenizer(self) -> bool:
        return self._source is not None

    @property
    def tokenizer(self) -> Any:
        """This thread's copy of the tokenizer (made on first use)."""
        if self._source is None:
            return None
        own = getattr(self._local, "tokenizer", None)
        if own is None:
            with self._copy_lock:  # deepcopy reads the source, which nothing else mutates
                own = self._local.tokenizer = copy.deepcopy(self._source)
        return own

    async def off_loop(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on a tokenizer thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._workers, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)

    def completion(self, req: CompletionRequest) -> list[list[int]]:
        """The request's prompts (one, or a batch) as token ids (call through `off_loop`)."""
        batch = _batch(req)
        if not batch:
            raise bad_request("the prompt is empty", param="prompt")
        return [self._ids(p) for p in batch]

    def _ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise bad_request("this model has no tokenizer: send token ids", param="prompt")
            ids = self.encode(prompt, add_special_tokens=True, param="prompt")
        else:
            ids = list(prompt)
        if not ids:
            raise bad_request("the prompt is empty", param="prompt")
        if len(ids) > self.max_model_len:
            raise prompt_too_long(self.max_model_len, len(ids), "prompt")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise bad_request(
                f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                param="prompt",
            )
        return ids

    def texts(self, req: CompletionRequest, prompts: list[list[int]]) -> list[str]:
        """Each prompt as text, for echo: a text prompt as sent, token ids decoded."""
        texts = []
        for given, ids in zip(_batch(req), prompts, strict=True):
            if isinstance(given, str):
                texts.append(given)
            else:
                texts.append(self.tokenizer.decode(ids) if self.tokenizer is not None else "")
        return texts

    def chat(
        self,
        messages: list[ChatMessageIn],
        template_kwargs: dict[str, Any] | None,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        add_special_tokens: bool = False,
        limited: bool = True,
    ) -> list[int]:
        """The messages (and tools) through the chat template, as token ids (call through
        `off_loop`). As engine.llm.render_chat, no special tokens are added by default: the
        template writes any BOS itself."""
        if not messages:
            raise bad_request("messages must not be empty", param="messages")
        rendered = [template_message(m, i) for i, m in enumerate(messages)]
        tokenizer = self.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise bad_request("this model has no chat template", param="messages")
        kwargs = dict(template_kwargs or {})
        if tools:
            kwargs["tools"] = tools
        try:
            text = tokenizer.apply_chat_template(
                rendered, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
            )
        except Exception as exc:  # a template can raise anything (jinja, TypeError on kwargs)
            raise bad_request(
                f"the chat template failed: {type(exc).__name__}: {exc}", param="messages"
            ) from None
        ids = self.encode(text, add_special_tokens, "messages", limited)
        if not ids:
            raise bad_request("the rendered chat prompt is empty", param="messages")
        return ids

    def encode(
        self, text: str, add_special_tokens: bool, param: str, limited: bool = True
    ) -> list[int]:
        """`text` as token ids; with `limited`, 400 (context_length_exceeded) when it has more
        than max_model_len tokens. Cheap for a huge text: every token stands for at most
        max_token_bytes bytes of text (tokenizers that decode back to the text: byte-level BPE,
        SentencePiece with byte fallback), so a text longer than max_model_len * max_token_bytes
        * SHRINK_MARGIN bytes cannot fit and is refused untokenized; otherwise a fast tokenizer
        encodes with the GIL released and its length is checked before its ids become a Python
        list (converting millions of ids holds the GIL for seconds)."""
        num_bytes = len(text.encode("utf-8"))
        at_least = num_bytes // (self.max_token_bytes * SHRINK_MARGIN)
        if limited and at_least > self.max_model_len:
            raise prompt_too_long(self.max_model_len, at_least, param, at_least=True)
        tokenizer = self.tokenizer
        backend = getattr(tokenizer, "_tokenizer", None)
        if not isinstance(backend, Tokenizer):  # a slow tokenizer: no shortcut
            return tokenizer.encode(text, add_special_tokens=add_special_tokens)
        # What PreTrainedTokenizerFast.encode runs, minus the BatchEncoding.
        encoding = backend.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        if limited and len(encoding) > self.max_model_len:
            raise prompt_too_long(self.max_model_len, len(encoding), param)
        return encoding.ids

    def decode(self, token_ids: list[int]) -> str:
        """Token ids to text, special tokens included (call through `off_loop`)."""
        return self.tokenizer.decode(token_ids)

    def token_strs(self, token_ids: list[int]) -> list[str]:
        """Each id's vocabulary string (call through `off_loop`)."""
        return self.tokenizer.convert_ids_to_tokens(token_ids)

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._decoder.decode([token_id]) if self._decoder is not None else ""
            self._token_text[token_id] = text
        return text


def template_message(message: ChatMessageIn, index: int) -> dict[str, Any]:
    """One API message as chat templates take it (transformers' convention): text content,
    tool calls with their arguments as a dict, the call id a tool message answers."""
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise bad_request(
                    f"only text content parts are supported, got {part.type!r}",
                    param=f"messages.{index}.content",
                )
            texts.append(part.text)
        content = "".join(texts)
    entry: dict[str, Any] = {"role": message.role, "content": content or ""}
    if message.name is not None:
        entry["name"] = message.name
    if message.tool_call_id is not None:
        entry["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        calls = []
        for j, call in enumerate(message.tool_calls):
            try:
                arguments = json.loads(call.function.arguments)
            except json.JSONDecodeError:
                raise bad_request(
                    f"tool call arguments must be JSON text, got {call.function.arguments!r}",
                    param=f"messages.{index}.tool_calls.{j}.function.arguments",
                ) from None
            function = {"name": call.function.name, "arguments": arguments}
            calls.append({"id": call.id, "type": "function", "function": function})
        entry["tool_calls"] = calls
    return entry


def _batch(req: CompletionRequest) -> list[str | list[int]]:
    """The request's prompts: one text, one token-id list, or a batch of either."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def longest_token_bytes(tokenizer: Any) -> int:
    """The most UTF-8 bytes any token's vocabulary string takes (byte-level and byte-fallback
    vocabularies spell each byte with at least one byte, so it bounds the text a token covers)."""
    vocab = tokenizer.get_vocab()
    return max((len(token.encode("utf-8", "replace")) for token in vocab), default=1) or 1


def floor_logprob(value: float) -> float:
    return value if value > LOGPROB_FLOOR else LOGPROB_FLOOR  # NaN too
