"""`workbench bench --url`: the online benchmark against our real server on the bundled model, in
both load modes; the report's numbers agree with each other, failures are counted, runs are saved.
Only consistency is asserted, never speed."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from bench.online import (
    RequestResult,
    arrival_times,
    base_url,
    parse_goodput,
    summarize_online,
)
from engine import AsyncLLM
from engine.server import BackgroundServer, ServerSettings, create_app
from store import open_store
from workbench.cli import main

KEY = "bench-key"
MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls lose to thread hand-offs
    llm = AsyncLLM("tiny", block_size=4, max_model_len=MAX_MODEL_LEN, num_kv_blocks=512)
    app = create_app(llm, ServerSettings(model_name="tiny", api_key=KEY))
    with BackgroundServer(app) as running:
        yield running
    llm.shutdown()
    torch.set_num_threads(before)


def bench(capsys, db: Path, *argv: str) -> tuple[int, dict | None, str]:
    """`workbench bench --json ...`: (exit status, the report, stderr)."""
    code = main(["bench", "--json", "--db", str(db), *argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def assert_ordered(stats: dict, values: list[float]) -> None:
    assert stats["p50"] <= stats["p90"] <= stats["p99"]
    assert min(values) - 1e-6 <= stats["mean"] <= max(values) + 1e-6
    assert min(values) - 1e-6 <= stats["p50"] and stats["p99"] <= max(values) + 1e-6


def check_consistent(report: dict, n: int, input_len: int | None, output_len: int) -> None:
    res, requests = report["results"], report["requests"]
    assert res["num_requests"] == res["completed"] == len(requests) == n
    assert res["failed"] == 0 and res["errors"] == {}
    assert all(r["ok"] and r["output_len"] == output_len for r in requests)
    assert res["total_output_tokens"] == n * output_len
    if input_len is not None:
        assert all(r["prompt_len"] == input_len for r in requests)
    assert res["total_input_tokens"] == sum(r["prompt_len"] for r in requests)
    wall = res["wall_s"]
    assert res["request_throughput"] == pytest.approx(n / wall)
    assert res["output_tok_s"] == pytest.approx(n * output_len / wall)
    assert res["total_tok_s"] == pytest.approx((res["total_input_tokens"] + n * output_len) / wall)
    assert res["usage_reported"]
    for key, field in (("ttft_ms", "ttft_s"), ("tpot_ms", "tpot_s"), ("e2e_ms", "e2e_s")):
        assert_ordered(res[key], [r[field] * 1e3 for r in requests])
    assert_ordered(res["itl_ms"], [g * 1e3 for r in requests for g in r["itl_s"]])
    for r in requests:
        assert 0 < r["ttft_s"] <= r["e2e_s"]
        assert len(r["itl_s"]) <= output_len - 1  # a chunk may carry several tokens
        assert r["tpot_s"] == pytest.approx((r["e2e_s"] - r["ttft_s"]) / (output_len - 1))
        assert r["start_s"] + r["e2e_s"] <= wall + 1e-6


def test_poisson_arrivals_on_completions(server, capsys, tmp_path):
    db = tmp_path / "wb.db"
    argv = [
        "--url", server.url, "--api-key", KEY, "--num-requests", "6", "--input-len", "8",
        "--output-len", "5", "--ignore-eos", "--request-rate", "40", "--seed", "3",
        "--goodput", "ttft:1e9", "tpot:1e9", "e2e:1e9",
    ]  # fmt: skip
    code, report, err = bench(capsys, db, *argv)
    assert code == 0, err
    check_consistent(report, 6, input_len=8, output_len=5)
    res = report["results"]
    # A huge SLO holds for every request: goodput is the request throughput.
    assert res["good_requests"] == 6
    assert res["goodput"] == pytest.approx(res["request_throughput"])
    assert res["goodput_slo_ms"] == {"ttft": 1e9, "tpot": 1e9, "e2e": 1e9}
    # Requests were sent at the Poisson arrival times drawn from the seed, not all at once.
    due = arrival_times(6, 40.0, 3)
    starts = [r["start_s"] for r in report["requests"]]
    assert all(s >= d - 1e-3 for s, d in zip(starts, due, strict=True))
    assert starts[-1] > 0.01
    bench_cfg, srv = report["bench"], report["server"]
    assert bench_cfg["request_rate"] == 40.0 and bench_cfg["max_concurrency"] is None
    assert bench_cfg["model"] == srv["model"] == "tiny" and srv["url"] == server.url
    assert srv["engine"]["device"] == "cpu" and srv["engine"]["block_size"] == 4
    assert report["command"].startswith("workbench bench --json --db")
    assert "saved as bench run #1" in err

    with open_store(db) as store:
        (run,) = store.list_bench_runs()
    assert (run.kind, run.model) == ("online", "tiny")
    assert run.results["completed"] == 6 and run.results["goodput"] == res["goodput"]
    assert run.config["bench"]["ignore_eos"] is True and "requests" not in run.config
    assert KEY not in json.dumps(run.config)  # the API key is not kept

    # The same load with a 0 ms TTFT SLO: nothing meets it.
    code, report, err = bench(capsys, db, *argv[:-4], "--goodput", "ttft:0")
    assert code == 0, err
    assert report["results"]["good_requests"] == 0 and report["results"]["goodput"] == 0.0


def test_fixed_concurrency_on_chat(server, capsys, tmp_path):
    code, report, err = bench(
        capsys,
        tmp_path / "wb.db",
        *("--url", server.url + "/v1/", "--api-key", KEY, "--endpoint", "chat"),
        *("--num-requests", "6", "--input-len", "12", "--output-len", "4", "--ignore-eos"),
        *("--max-concurrency", "2"),
    )
    assert code == 0, err
    check_consistent(report, 6, input_len=None, output_len=4)
    requests = report["requests"]
    # Chat prompts are decoded ids inside the chat template: longer than the ids themselves.
    assert all(r["prompt_len"] > 12 for r in requests)
    assert report["results"]["peak_concurrency"] == 2
    assert report["results"]["goodput"] is None  # no SLO given
    for r in requests:  # at most two in flight: fewer than two others ran when each started
        t = r["start_s"]
        running = [
            o for o in requests if o is not r and o["start_s"] <= t < o["start_s"] + o["e2e_s"]
        ]
        assert len(running) < 2


def test_the_table_and_failed_requests_that_do_not_stop_the_run(server, capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    too_long = "word " * (MAX_MODEL_LEN * 2)
    prompts.write_text(f"Once upon a time\n{too_long}\nThe cat sat\n")
    code = main(
        [
            "bench", "--url", server.url, "--api-key", KEY, "--prompts", str(prompts),
            "--num-requests", "6", "--output-len", "3", "--db", str(tmp_path / "wb.db"),
        ]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "successful requests          4   failed 2" in out
    assert "2 × HTTP 400: " in out and "maximum context length" in out
    for label in ("TTFT", "TPOT", "ITL", "E2E", "p50", "p90", "p99", "requests/s"):
        assert label in out
    with open_store(tmp_path / "wb.db") as store:
        (run,) = store.list_bench_runs(kind="online")
    assert run.results["failed"] == 2 and run.results["completed"] == 4


def test_unreachable_server_wrong_key_and_wrong_model_are_one_line(server, capsys, tmp_path):
    db = tmp_path / "wb.db"
    code, report, err = bench(capsys, db, "--url", "http://127.0.0.1:9")
    assert code == 1 and report is None
    assert err.count("\n") == 1 and err.startswith("workbench: error: cannot reach the server")
    code, report, err = bench(capsys, db, "--url", server.url, "--api-key", "wrong")
    assert code == 1 and "refused the API key (HTTP 401)" in err and "Traceback" not in err
    code, _, err = bench(capsys, db, "--url", server.url, "--api-key", KEY, "--model", "gpt-9")
    assert code == 1 and "serves tiny, not 'gpt-9'" in err
    code, _, err = bench(capsys, db, "--url", server.url, "--block-size", "4")
    assert code == 2 and "--block-size: not with --url" in err
    code, _, err = bench(capsys, db, "--request-rate", "3")
    assert code == 2 and "--request-rate: only with --url" in err
    with open_store(db) as store:
        assert store.list_bench_runs() == []


def test_offline_runs_are_saved_too(capsys, tmp_path):
    db = tmp_path / "wb.db"
    argv = ["--num-requests", "2", "--input-len", "4", "--output-len", "2", "--block-size", "4"]
    code, report, err = bench(capsys, db, *argv, "--json-out", str(tmp_path / "r.json"))
    assert code == 0, err
    assert report["kind"] == "offline" and report["results"]["total_output_tokens"] == 4
    with open_store(db) as store:
        (run,) = store.list_bench_runs()
    assert (run.kind, run.model) == ("offline", "tiny")
    assert run.results["num_requests"] == 2 and run.config["engine"]["block_size"] == 4


# --- the pieces -------------------------------------------------------------------------------


def test_goodput_and_url_parsing():
    assert parse_goodput(["ttft:500", "TPOT:50.5", "e2e:0"]) == {
        "ttft": 500.0,
        "tpot": 50.5,
        "e2e": 0.0,
    }
    for bad in ("ttft", "itl:5", "ttft:fast", "ttft:-1", "e2e:inf"):
        with pytest.raises(ValueError, match="goodput SLO"):
            parse_goodput([bad])
    assert base_url("http://h:8000/v1/") == "http://h:8000"
    assert base_url("localhost:8000") == "http://localhost:8000"
    with pytest.raises(ValueError, match="http:// or https://"):
        base_url("ftp://h")


def test_arrivals_are_poisson_and_seeded():
    times = arrival_times(2000, 10.0, seed=1)
    assert times == arrival_times(2000, 10.0, seed=1) != arrival_times(2000, 10.0, seed=2)
    assert times[0] == 0.0 and all(b >= a for a, b in zip(times, times[1:], strict=False))
    assert times[-1] / 1999 == pytest.approx(0.1, rel=0.1)  # mean gap 1 / rate
    assert arrival_times(3, math.inf, seed=1) == [0.0, 0.0, 0.0]


def test_goodput_counts_requests_that_meet_every_slo():
    def done(ttft: float, e2e: float, n: int) -> RequestResult:
        return RequestResult(ok=True, prompt_len=4, output_len=n, ttft_s=ttft, e2e_s=e2e)

    results = [
        done(0.1, 0.5, 5),  # TPOT 100 ms
        done(0.3, 0.7, 5),
        done(0.1, 0.1, 1),  # one token: no TPOT, meets that SLO
        RequestResult(ok=False, error="HTTP 400: too long"),
    ]
    res = summarize_online(results, 2.0, {"ttft": 200, "tpot": 100})
    assert (res["completed"], res["failed"], res["good_requests"]) == (3, 1, 2)
    assert res["goodput"] == 1.0 and res["request_throughput"] == 1.5
    assert res["errors"] == {"HTTP 400: too long": 1}
    assert res["tpot_ms"]["p50"] == pytest.approx(100.0)
    assert summarize_online(results, 2.0, {"e2e": 0})["goodput"] == 0.0


def test_request_id_extension_names_the_request(server):
    """vLLM's `request_id` field: the response id (and the engine's request) carry it."""
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 2, "request_id": "bench-7"}
    headers = {"Authorization": f"Bearer {KEY}"}
    out = httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=60)
    assert out.status_code == 200 and out.json()["id"] == "cmpl-bench-7"
    body["request_id"] = "x" * 129
    assert httpx.post(server.url + "/v1/completions", json=body, headers=headers).status_code == 400
