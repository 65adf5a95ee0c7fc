"""panels.context: which messages a chat sends to fit the model's context (a pure function;
tokens counted here as characters so that the cuts can be asserted exactly)."""

from __future__ import annotations

from panels.context import fit_messages, reply_room


def chars(messages: list[dict[str, str]]) -> int:
    return sum(len(m["content"]) for m in messages)


def conversation(*contents: str, system: str | None = "sys") -> list[dict[str, str]]:
    out = [{"role": "system", "content": system}] if system else []
    for i, content in enumerate(contents):
        out.append({"role": "user" if i % 2 == 0 else "assistant", "content": content})
    return out


def test_the_oldest_turns_go_first_and_the_system_prompt_stays() -> None:
    messages = conversation("a" * 10, "b" * 10, "c" * 10, "d" * 10, "e" * 10)  # 3 + 50 chars
    fit = fit_messages(messages, chars, context=40, max_tokens=4, drop_oldest=True)
    # room for the reply: min(4, 40 // 4) = 4, so the prompt may take 36: sys + c, d, e = 33
    assert [m["content"][0] for m in fit.messages] == ["s", "c", "d", "e"]
    assert (fit.prompt_tokens, fit.dropped, fit.fits) == (33, 2, True)
    assert reply_room(512, 1024) == 256 and reply_room(16, 1024) == 16


def test_what_is_left_starts_with_a_user_turn() -> None:
    messages = conversation("a" * 10, "b" * 30, "c" * 5)
    fit = fit_messages(messages, chars, context=20, max_tokens=2, drop_oldest=True)
    assert [m["role"] for m in fit.messages] == ["system", "user"]  # not a lone assistant turn
    assert fit.messages[-1]["content"] == "c" * 5 and fit.dropped == 2


def test_without_dropping_or_when_the_message_alone_is_too_long_it_does_not_fit() -> None:
    messages = conversation("a" * 10, "b" * 10, "c" * 30, system=None)
    kept = fit_messages(messages, chars, context=40, max_tokens=4, drop_oldest=False)
    assert kept.messages == messages and not kept.fits
    assert "Drop oldest turns" in kept.refusal(drop_oldest=False)
    alone = fit_messages(messages, chars, context=25, max_tokens=4, drop_oldest=True)
    assert alone.messages == messages[-1:] and not alone.fits
    assert "too long even on its own" in alone.refusal(drop_oldest=True)


def test_an_engine_that_cannot_count_sends_everything() -> None:
    messages = conversation("a" * 100)
    fit = fit_messages(messages, lambda m: None, context=10, max_tokens=4, drop_oldest=True)
    assert fit.messages == messages and fit.prompt_tokens is None and fit.fits
