"""The pure stop rules (`engine.stop.check_stop`): stop token ids, EOS, min_tokens, length."""

from __future__ import annotations

from engine.config import SamplingParams
from engine.request import Request, RequestStatus
from engine.stop import Stop, check_stop

EOS = 2


def request(prompt_len: int = 4, **params) -> Request:
    return Request(
        request_id="r",
        prompt_token_ids=list(range(10, 10 + prompt_len)),
        params=SamplingParams(**params),
        eos_token_ids=(EOS,),
    )


def test_a_stop_token_id_stops_with_its_id_as_the_reason():
    r = request(stop_token_ids=[5], max_tokens=8)
    assert check_stop(r, 5, 1, max_model_len=64) == Stop(RequestStatus.FINISHED_STOPPED, 5)
    assert check_stop(r, 6, 1, max_model_len=64) is None


def test_eos_stops_unless_ignored_and_neither_before_min_tokens():
    assert check_stop(request(), EOS, 1, 64) == Stop(RequestStatus.FINISHED_STOPPED)
    assert check_stop(request(ignore_eos=True), EOS, 1, 64) is None
    r = request(min_tokens=3, stop_token_ids=[5])
    assert check_stop(r, EOS, 2, 64) is None and check_stop(r, 5, 2, 64) is None
    assert check_stop(r, EOS, 3, 64) == Stop(RequestStatus.FINISHED_STOPPED)


def test_length_by_max_tokens_or_max_model_len_and_a_stop_token_wins_over_length():
    r = request(prompt_len=4, max_tokens=3)
    assert check_stop(r, 6, 2, 64) is None
    assert check_stop(r, 6, 3, 64) == Stop(RequestStatus.FINISHED_LENGTH)
    assert check_stop(request(prompt_len=4, max_tokens=99), 6, 4, 8) == Stop(
        RequestStatus.FINISHED_LENGTH
    )
    assert check_stop(request(max_tokens=1), EOS, 1, 64).by_stop_token


def test_check_stop_changes_nothing():
    r = request(stop_token_ids=[5])
    check_stop(r, 5, 1, 64)
    assert r.status is RequestStatus.WAITING and r.stop_reason is None
