"""POST /tokenize and /detokenize, in vLLM's shapes: a prompt (or chat messages through the chat
template) to token ids, and token ids back to text. Both run on the tokenizer threads."""

from __future__ import annotations

from engine.server.context import ServerContext
from engine.server.errors import bad_request, check_encodable
from engine.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)


async def tokenize(ctx: ServerContext, req: TokenizeRequest) -> TokenizeResponse:
    check_encodable(req, "")
    ctx.check_model(req.model)
    prompts = ctx.prompts
    if not prompts.has_tokenizer:
        raise bad_request("this model has no tokenizer", param="prompt")
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("send either prompt or messages", param="prompt")
    # Counting tokens is allowed past max_model_len; the body-size limit bounds the work.
    if req.prompt is not None:
        special = True if req.add_special_tokens is None else req.add_special_tokens
        ids = await prompts.off_loop(prompts.encode, req.prompt, special, "prompt", False)
    else:
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        ids = await prompts.off_loop(
            prompts.chat,
            req.messages,
            req.chat_template_kwargs,
            tools=tools,
            add_generation_prompt=req.add_generation_prompt,
            add_special_tokens=bool(req.add_special_tokens),
            limited=False,
        )
    strs = await prompts.off_loop(prompts.token_strs, ids) if req.return_token_strs else None
    return TokenizeResponse(
        count=len(ids), max_model_len=ctx.max_model_len, tokens=ids, token_strs=strs
    )


async def detokenize(ctx: ServerContext, req: DetokenizeRequest) -> DetokenizeResponse:
    ctx.check_model(req.model)
    prompts = ctx.prompts
    if not prompts.has_tokenizer:
        raise bad_request("this model has no tokenizer", param="tokens")
    bad = [t for t in req.tokens if not 0 <= t < prompts.vocab_size]
    if bad:
        raise bad_request(
            f"token id {bad[0]} is outside the vocabulary [0, {prompts.vocab_size})",
            param="tokens",
        )
    return DetokenizeResponse(prompt=await prompts.off_loop(prompts.decode, req.tokens))
