"""API request fields -> engine SamplingParams (one per choice) and the structured-output spec.

Bounds are SamplingParams' own (its ValueError becomes a 400 naming the field); this module adds
only what the engine cannot know: OpenAI defaults, n and seeds, and the length rule
prompt + max_tokens <= max_model_len."""

from __future__ import annotations

import dataclasses
from typing import Any

from engine.config import SamplingParams
from engine.server.errors import APIError, bad_request, from_value_error, prompt_too_long
from engine.server.protocol import SamplingRequest
from engine.structured import StructuredSpec

MAX_N = 128
# The engine checks every stop string after every token: bound the work one request can add to
# its neighbours' steps.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_SEED = 2**63  # seeds of the n choices are seed, seed + 1, ...: all stay below 2**64
GREEDY_BELOW = 1e-5  # temperatures this small are greedy (dividing by them overflows)
REQUEST_FIELDS = frozenset(
    {f.name for f in dataclasses.fields(SamplingParams)} | {"n", "seed", "max_completion_tokens"}
)


def structured_spec(req: SamplingRequest) -> StructuredSpec | None:
    """The one structured-output constraint the request sets, if any (400 if several)."""
    found: list[tuple[str, StructuredSpec]] = []
    try:
        fmt = req.response_format
        if fmt is not None and fmt.type == "json_object":
            found.append(("response_format", StructuredSpec.json_object()))
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise bad_request(
                    "response_format of type json_schema needs json_schema.schema",
                    param="response_format",
                )
            found.append(("response_format", StructuredSpec.json_schema(fmt.json_schema.schema_)))
        if req.guided_json is not None:
            found.append(("guided_json", StructuredSpec.json_schema(req.guided_json)))
        if req.guided_regex is not None:
            found.append(("guided_regex", StructuredSpec.regex(req.guided_regex)))
        if req.guided_grammar is not None:
            found.append(("guided_grammar", StructuredSpec.grammar(req.guided_grammar)))
        if req.guided_choice is not None:
            found.append(("guided_choice", StructuredSpec.choice(req.guided_choice)))
        so = req.structured_outputs
        if so is not None:
            if so.json_ is not None:
                found.append(("structured_outputs.json", StructuredSpec.json_schema(so.json_)))
            if so.json_object:
                found.append(("structured_outputs.json_object", StructuredSpec.json_object()))
            if so.regex is not None:
                found.append(("structured_outputs.regex", StructuredSpec.regex(so.regex)))
            if so.grammar is not None:
                found.append(("structured_outputs.grammar", StructuredSpec.grammar(so.grammar)))
            if so.choice is not None:
                found.append(("structured_outputs.choice", StructuredSpec.choice(so.choice)))
    except ValueError as exc:
        raise bad_request(str(exc), param="response_format") from None
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise bad_request(f"set only one structured-output constraint, got {names}")
    return found[0][1] if found else None


def sampling_params(
    req: SamplingRequest,
    *,
    max_tokens: int,
    logprobs: int | None,
    structured: StructuredSpec | None,
    renamed: dict[str, str] | None = None,
    prompt_logprobs: int | None = None,
) -> list[SamplingParams]:
    """One SamplingParams per choice (n of them); choice i is seeded with seed + i. `renamed`:
    engine field -> the request field it came from, so a 400 names what the client sent."""
    if not isinstance(req.n, int) or not 1 <= req.n <= MAX_N:
        raise bad_request(f"n must be in [1, {MAX_N}], got {req.n}", param="n")
    check_stops(req)
    if req.seed is not None and not 0 <= req.seed < MAX_SEED:
        raise bad_request(f"seed must be in [0, 2**63), got {req.seed}", param="seed")
    temperature = 1.0 if req.temperature is None else req.temperature
    if 0.0 <= temperature < GREEDY_BELOW:
        temperature = 0.0
    kwargs: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "top_k": req.top_k or 0,
        "min_p": req.min_p or 0.0,
        "repetition_penalty": 1.0 if req.repetition_penalty is None else req.repetition_penalty,
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "stop": [] if req.stop is None else req.stop,
        "stop_token_ids": req.stop_token_ids or [],
        "include_stop_str_in_output": req.include_stop_str_in_output,
        "ignore_eos": req.ignore_eos,
        "min_tokens": req.min_tokens or 0,
        "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs,
        "skip_special_tokens": req.skip_special_tokens,
    }
    if structured is not None:
        kwargs["structured"] = structured
    try:
        return [
            SamplingParams(**kwargs, seed=None if req.seed is None else req.seed + i)
            for i in range(req.n)
        ]
    except (ValueError, TypeError) as exc:
        error = from_value_error(ValueError(str(exc)), REQUEST_FIELDS)
        if renamed and error.param in renamed:
            error.message = error.message.replace(error.param, renamed[error.param], 1)
            error.param = renamed[error.param]
        raise error from None


def check_stops(req: SamplingRequest) -> None:
    """400 past the bounds on stop strings (count, length) and stop token ids."""
    stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(
            f"stop has {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed", param="stop"
        )
    longest = max((len(s) for s in stops), default=0)
    if longest > MAX_STOP_STRING_CHARS:
        raise bad_request(
            f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters, got one of "
            f"{longest}",
            param="stop",
        )
    ids = req.stop_token_ids or []
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise bad_request(
            f"stop_token_ids has {len(ids)} ids; at most {MAX_STOP_TOKEN_IDS} are allowed",
            param="stop_token_ids",
        )


def resolve_max_tokens(
    requested: int | None,
    default: int | None,
    prompt_len: int,
    max_model_len: int,
    param: str,
    prompt_param: str = "prompt",
) -> int:
    """max_tokens to run with; 400 when the prompt alone, or prompt + max_tokens, is too long.
    `default` None: whatever room the context leaves."""
    if prompt_len >= max_model_len:
        raise prompt_too_long(max_model_len, prompt_len, prompt_param)
    if requested is None:
        requested = default if default is not None else max_model_len - prompt_len
        requested = min(requested, max_model_len - prompt_len)
    if isinstance(requested, int) and requested >= 1 and prompt_len + requested > max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
            f"{requested} for the completion). Please reduce the prompt or {param}.",
            param=param,
            code="context_length_exceeded",
        )
    return requested
