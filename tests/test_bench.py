"""`workbench bench` on a tiny random checkpoint: the report's numbers agree with each other, the
concurrency limit holds, and the transformers peer runs on the same weights. Only consistency is
asserted, never speed."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_checkpoints import cached_tiny_checkpoint, make_tiny_eagle_head

from bench.hf import build_hf_model, engine_weights_as_hf
from bench.offline import BenchConfig, run_benchmark
from engine.config import EngineConfig, SamplingParams
from engine.core import EngineCore
from engine.llm import LLM
from engine.model.loader import iter_safetensors
from workbench.cli import main


def run_bench(capsys, tmp_path, *argv: str) -> tuple[dict, str]:
    out_file = tmp_path / "report.json"
    code = main(["bench", *argv, "--json-out", str(out_file)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(out_file.read_text()), captured.out


def assert_ordered_stats(stats: dict, values: list[float]) -> None:
    assert stats["p50"] <= stats["p90"] <= stats["p99"]
    assert min(values) - 1e-9 <= stats["mean"] <= max(values) + 1e-9
    assert min(values) - 1e-9 <= stats["p50"] and stats["p99"] <= max(values) + 1e-9


def test_small_bench_report_is_consistent(llama_checkpoint, capsys, tmp_path):
    argv = [
        "--model", str(llama_checkpoint), "--num-requests", "4", "--input-len", "8",
        "--output-len", "4", "--concurrency", "2", "--warmup", "1", "--block-size", "4",
    ]  # fmt: skip
    report, printed = run_bench(capsys, tmp_path, *argv)
    res, requests = report["results"], report["requests"]

    assert len(requests) == res["num_requests"] == 4
    assert all(r["output_len"] == 4 and r["prompt_len"] == 8 for r in requests)
    assert res["total_output_tokens"] == 16 and res["total_input_tokens"] == 32
    wall = res["wall_s"]
    assert res["output_tok_s"] == pytest.approx(16 / wall)
    assert res["total_tok_s"] == pytest.approx(48 / wall)
    assert res["request_throughput"] == pytest.approx(4 / wall)

    for key, field in (("ttft_ms", "ttft_s"), ("tpot_ms", "tpot_s"), ("e2e_ms", "e2e_s")):
        assert_ordered_stats(res[key], [r[field] * 1e3 for r in requests])
    for r in requests:
        assert 0 < r["ttft_s"] <= r["e2e_s"]
        # TPOT spans the three gaps between four tokens.
        assert r["tpot_s"] == pytest.approx((r["e2e_s"] - r["ttft_s"]) / 3, rel=1e-6)
        assert r["arrival_s"] + r["e2e_s"] <= wall + 1e-6
    # At most two in flight: when each request arrived, fewer than two others were running.
    for r in requests:
        t = r["arrival_s"]
        others = [o for o in requests if o is not r and o["arrival_s"] <= t]
        running = [o for o in others if o["arrival_s"] + o["e2e_s"] > t]
        assert len(running) < 2
    assert max(r["arrival_s"] for r in requests) > 0  # the last two waited for a slot

    assert report["command"] == "workbench bench " + " ".join(
        argv + ["--json-out", str(tmp_path / "report.json")]
    )
    assert report["engine_config"]["model"] == str(llama_checkpoint)
    assert report["engine_config"]["block_size"] == 4
    assert report["bench"]["warmup"] == 1 and report["concurrency"] == 2
    assert set(report["versions"]) >= {"python", "torch", "transformers"}
    assert report["system"]["device_name"] and report["date"].startswith("20")
    assert report["peer"] is None
    for label in ("TTFT", "TPOT", "E2E", "p50", "p90", "p99", "output tokens/s"):
        assert label in printed


def test_compare_hf_fills_the_peer_fields(llama_checkpoint, capsys, tmp_path):
    report, printed = run_bench(
        capsys, tmp_path, "--model", str(llama_checkpoint), "--num-requests", "4",
        "--input-len", "8", "--output-len", "4", "--concurrency", "2", "--compare", "hf",
    )  # fmt: skip
    peer = report["peer"]
    assert peer["name"] == "hf" and peer["batch_size"] == 2 and peer["num_batches"] == 2
    assert peer["total_output_tokens"] == 16
    assert peer["output_tok_s"] == pytest.approx(16 / peer["wall_s"])
    assert peer["ratio"] == pytest.approx(report["results"]["output_tok_s"] / peer["output_tok_s"])
    # Same weights, greedy: transformers produced our tokens.
    assert peer["same_tokens"] == 4
    assert "ours / HF" in printed


def test_prompts_file_is_tokenized_and_cycled(llama_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n\nThe cat\nHello there, friend\n")
    config = BenchConfig(num_requests=5, output_len=3, prompts_file=str(prompts))
    report = run_benchmark(EngineConfig(model=str(llama_checkpoint)), config)
    tokenizer = EngineCore(EngineConfig(model=str(llama_checkpoint))).tokenizer
    lines = ["Once upon a time", "The cat", "Hello there, friend"]
    lengths = [len(tokenizer.encode(lines[i % 3])) for i in range(5)]
    assert [r["prompt_len"] for r in report["requests"]] == lengths
    assert report["bench"]["num_requests"] == 5 and report["concurrency"] == 5
    assert all(r["output_len"] == 3 for r in report["requests"])


def test_too_long_for_the_model_is_a_one_line_error(llama_checkpoint, capsys):
    code = main(
        ["bench", "--model", str(llama_checkpoint), "--input-len", "300", "--output-len", "300"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "max_model_len" in err


def test_engine_weights_unfuse_back_to_the_checkpoint(llama_checkpoint):
    core = EngineCore(EngineConfig(model=str(llama_checkpoint)))
    ours = engine_weights_as_hf(core.model)
    theirs = dict(iter_safetensors(llama_checkpoint))
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


@pytest.mark.parametrize("family", ["llama3", "mixtral", "qwen3_moe"])
def test_dummy_weights_are_shared_with_the_hf_model(family, checkpoint_root):
    checkpoint = cached_tiny_checkpoint(checkpoint_root, family)
    llm = LLM(str(checkpoint), load_format="dummy", seed=7)
    core = llm.engine
    hf = build_hf_model(llm.config, core.model, core.device, core.dtype)
    hf_state = hf.state_dict()
    for name, tensor in engine_weights_as_hf(core.model).items():
        # One copy: transformers' parameter is the engine's own storage.
        assert hf_state[name].data_ptr() == tensor.data_ptr(), name
    # And transformers computes what the engine computes from them.
    prompt = [5, 17, 99, 3]
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, -1].float(), dim=-1)
    ours = llm.generate(prompt, SamplingParams(max_tokens=1, ignore_eos=True, logprobs=0))[0]
    token = ours.token_ids[0]
    assert token == int(logprobs.argmax())
    assert ours.logprobs[0].logprob == pytest.approx(float(logprobs[token]), abs=1e-4)


def test_speculative_bench_runs_both_ways_and_stays_lossless(llama_checkpoint, capsys, tmp_path):
    argv = [
        "--model", str(llama_checkpoint), "--num-requests", "3", "--input-len", "12",
        "--output-len", "10", "--concurrency", "3", "--block-size", "4",
        "--speculative", "draft", "--draft-model", str(llama_checkpoint), "--spec-tokens", "3",
    ]  # fmt: skip
    report, printed = run_bench(capsys, tmp_path, *argv)
    assert report["same_tokens"] == report["num_requests"] == 3
    spec = report["results"]["spec"]
    assert spec["acceptance_rate"] == 1.0  # the target drafting for itself
    assert spec["num_accepted"] == spec["num_proposed"] > 0
    assert report["speedup"] == pytest.approx(
        report["results"]["output_tok_s"] / report["plain"]["output_tok_s"]
    )
    assert "speedup" in printed and "acceptance 100.0%" in printed


def test_eagle_bench_runs_next_to_plain_decoding(llama_checkpoint, capsys, tmp_path):
    head = make_tiny_eagle_head(llama_checkpoint, tmp_path / "head", seed=2, draft_vocab_size=64)
    argv = [
        "--model", str(llama_checkpoint), "--num-requests", "2", "--input-len", "9",
        "--output-len", "8", "--concurrency", "2", "--block-size", "4",
        "--speculative", "eagle", "--draft-model", str(head), "--spec-tokens", "2",
    ]  # fmt: skip
    report, printed = run_bench(capsys, tmp_path, *argv)
    assert report["speculative"] == {"method": "eagle", "num_tokens": 2, "model": str(head)}
    assert report["same_tokens"] == report["num_requests"] == 2
    assert report["results"]["spec"]["num_proposed"] > 0
    assert "tokens per verify step" in printed


def test_bad_speculative_option_is_a_one_line_error(capsys):
    assert main(["bench", "--speculative", "ngram", "--spec-tokens", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("workbench: error:") and "num_tokens" in err and "\n" not in err
