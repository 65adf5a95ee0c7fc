"""The `workbench` CLI, run in-process through `main([...])` on a tiny random checkpoint: generate,
its JSON lines, one-line errors with exit status 2, the chat REPL fed from a pipe (replies, history,
/stats, /reset, Ctrl-C stopping a reply) and `launch` handing over to the TUI."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import assert_pool_whole

from engine import LLM, AsyncLLM, SamplingParams
from workbench.chat_repl import ChatREPL
from workbench.cli import engine_config_from_args, main, sampling_params_from_args

REPO = Path(__file__).resolve().parent.parent


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- generate ---------------------------------------------------------------------------------


def test_generate_prints_what_llm_generate_returns(llama_checkpoint, capsys):
    prompts = ["Hello", "The cat sat"]
    code, out, err = run_cli(
        capsys, "generate", "--model", str(llama_checkpoint), "--max-tokens", "12",
        "--prompt", prompts[0], "--prompt", prompts[1],
    )  # fmt: skip
    assert code == 0, err
    expected = LLM(str(llama_checkpoint)).generate(prompts, SamplingParams(max_tokens=12))
    assert all(o.text for o in expected)
    assert out == "".join(o.text + "\n" for o in expected)


def test_generate_json_lines_parse_and_match_llm_chat(llama_checkpoint, capsys):
    code, out, err = run_cli(
        capsys, "generate", "--model", str(llama_checkpoint), "--chat", "--json",
        "--max-tokens", "6", "--ignore-eos", "--prompt", "hi", "--prompt", "bye",
    )  # fmt: skip
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in records] == ["hi", "bye"]
    expected = LLM(str(llama_checkpoint)).chat(
        [[{"role": "user", "content": p}] for p in ("hi", "bye")],
        SamplingParams(max_tokens=6, ignore_eos=True),
    )
    for record, want in zip(records, expected, strict=True):
        assert set(record) == {"prompt", "text", "token_ids", "finish_reason", "ttft"}
        assert record["token_ids"] == want.token_ids and len(record["token_ids"]) == 6
        assert record["text"] == want.text
        assert record["finish_reason"] == "length"
        assert record["ttft"] > 0


def test_options_map_onto_the_engine_and_sampling_dataclasses():
    from workbench.cli import build_parser

    args = build_parser().parse_args(
        ["generate", "--prompt", "x", "--model", "m", "--dtype", "float32", "--block-size", "4",
         "--max-num-tokens", "32", "--max-num-seqs", "3", "--max-model-len", "100",
         "--num-kv-blocks", "50", "--no-prefix-caching", "--load-format", "dummy",
         "--device", "cpu", "--max-tokens", "9", "--temperature", "0.7", "--top-p", "0.9",
         "--top-k", "5", "--min-p", "0.1", "--repetition-penalty", "1.2", "--seed", "3",
         "--stop", "a", "--stop", "bc", "--ignore-eos", "--tensor-parallel-size", "2"]
    )  # fmt: skip
    config = engine_config_from_args(args)
    assert (config.model, config.dtype, config.device, config.block_size) == (
        "m", "float32", "cpu", 4
    )  # fmt: skip
    assert (config.max_num_tokens, config.max_num_seqs, config.max_model_len) == (32, 3, 100)
    assert (config.num_kv_blocks, config.enable_prefix_caching, config.load_format) == (
        50, False, "dummy"
    )  # fmt: skip
    assert config.tensor_parallel_size == 2
    params = sampling_params_from_args(args)
    assert params == SamplingParams(
        max_tokens=9, temperature=0.7, top_p=0.9, top_k=5, min_p=0.1, repetition_penalty=1.2,
        seed=3, stop=["a", "bc"], ignore_eos=True,
    )  # fmt: skip
    # Options left out keep the dataclasses' own defaults.
    bare = build_parser().parse_args(["generate", "--prompt", "x"])
    assert sampling_params_from_args(bare) == SamplingParams()
    assert engine_config_from_args(bare) == type(config)()


# --- errors -----------------------------------------------------------------------------------


def test_unknown_model_is_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    code, out, err = run_cli(capsys, "generate", "--model", str(missing), "--prompt", "x")
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("workbench: error: ")
    assert str(missing) in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["generate", "--prompt", "x", "--temperature", "-1"], "temperature"),
        (["chat", "--top-p", "0"], "top_p"),
        (["generate", "--prompt", "x", "--block-size", "0"], "block_size"),
        (["generate", "--prompt", "x", "--temperature", "warm"], "--temperature"),
        (["bench", "--concurrency", "0"], "concurrency"),
        (["generate"], "--prompt"),
    ],
)
def test_bad_values_are_one_line_and_exit_2(llama_checkpoint, capsys, argv, named):
    code, out, err = run_cli(capsys, *argv, "--model", str(llama_checkpoint))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("workbench: error: ")
    assert named in err


def test_a_rejected_prompt_is_reported_and_the_others_print(llama_checkpoint, capsys):
    code, out, err = run_cli(
        capsys, "generate", "--model", str(llama_checkpoint), "--max-model-len", "16",
        "--max-tokens", "4", "--prompt", "short", "--prompt", "x" * 40,
    )  # fmt: skip
    assert code == 2
    assert err.startswith("workbench: error: ") and "max_model_len" in err
    assert len(out.splitlines()) >= 1


def test_python_dash_m_workbench_runs_the_cli():
    done = subprocess.run(
        [sys.executable, "-m", "workbench", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    for command in ("launch", "generate", "chat", "bench"):
        assert command in done.stdout


# --- chat -------------------------------------------------------------------------------------


def test_chat_repl_from_a_pipe_replies_and_prints_stats(llama_checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/stats\n/exit\n"))
    code, out, err = run_cli(capsys, "chat", "--model", str(llama_checkpoint), "--max-tokens", "8")
    assert code == 0, err
    reply = LLM(str(llama_checkpoint)).chat(
        [{"role": "user", "content": "hello"}], SamplingParams(max_tokens=8)
    )[0]
    assert reply.text
    assert out.startswith(reply.text + "\n")
    stats = out[len(reply.text) + 1 :]
    assert f"| {len(reply.token_ids)} tokens |" in stats
    assert "TTFT " in stats and " ms" in stats and "tok/s" in stats
    assert "KV cache: 0/" in stats  # the finished reply gave its blocks back


def test_chat_keeps_history_and_reset_forgets_it(llama_checkpoint):
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    llm = AsyncLLM(str(llama_checkpoint))
    stdout = io.StringIO()
    # The input ends without /exit: end of input quits too.
    stdin = io.StringIO("hi\nmore\n/reset\nhi\n")
    repl = ChatREPL(llm, params, system="Be brief.", stdin=stdin, stdout=stdout)
    assert repl.run() == 0

    offline = LLM(str(llama_checkpoint))
    system = {"role": "system", "content": "Be brief."}
    first = offline.chat([system, {"role": "user", "content": "hi"}], params)[0].text
    second = offline.chat(
        [
            system,
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "more"},
        ],
        params,
    )[0].text
    assert stdout.getvalue() == f"{first}\n{second}\n(history cleared)\n{first}\n"
    assert repl.history == [
        system,
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": first},
    ]


class _InterruptOnFirstReply(io.StringIO):
    """A stdout that presses Ctrl-C (a real SIGINT to this process) as the first reply text
    arrives, i.e. while the reply is streaming."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = False

    def write(self, text: str) -> int:
        n = super().write(text)
        if not self.sent and text.strip():
            self.sent = True
            signal.raise_signal(signal.SIGINT)
        return n


@pytest.mark.skipif(
    signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
    reason="SIGINT is handled by someone else here",
)
def test_ctrl_c_stops_the_reply_and_frees_its_blocks(llama_checkpoint):
    llm = AsyncLLM(str(llama_checkpoint))
    stdout = _InterruptOnFirstReply()
    # 400 tokens take far longer than the interrupt needs to land.
    params = SamplingParams(max_tokens=400, ignore_eos=True)
    repl = ChatREPL(llm, params, stdin=io.StringIO("tell me\n/stats\n/exit\n"), stdout=stdout)
    assert repl.run() == 0
    out = stdout.getvalue()
    assert stdout.sent and "[reply stopped]" in out
    assert repl.last is not None and repl.last.finish_reason == "abort"
    assert 1 <= repl.last.num_tokens < 400
    assert "finish abort" in out and "KV cache: 0/" in out
    assert_pool_whole(llm)  # aborted: no request holds a block
    # The stopped reply stays in the history, as it was shown.
    assert [m["role"] for m in repl.history] == ["user", "assistant"]
    assert repl.history[1]["content"] and repl.history[1]["content"] in out


def test_chat_on_a_model_without_a_chat_template_is_one_line(tmp_path, capsys, monkeypatch):
    from tiny_checkpoints import make_tiny_checkpoint

    path = make_tiny_checkpoint("llama3", tmp_path / "plain")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    capsys.readouterr()  # drop the checkpoint writer's progress bar
    code, out, err = run_cli(capsys, "chat", "--model", str(path))
    assert code == 2
    assert err.count("\n") == 1 and "no chat template" in err


# --- launch -----------------------------------------------------------------------------------


def test_launch_hands_its_arguments_to_run_app(capsys, monkeypatch, tmp_path):
    seen = {}

    def run_app(args) -> int:
        seen["args"] = args
        return 0

    app = types.ModuleType("workbench.app")
    app.run_app = run_app
    monkeypatch.setitem(sys.modules, "workbench.app", app)
    db = str(tmp_path / "w.db")
    code, _, err = run_cli(capsys, "launch", "--model", "tiny", "--db", db, "--block-size", "8")
    assert code == 0, err
    args = seen["args"]
    assert (args.model, args.db) == ("tiny", db)
    assert args.engine_config.block_size == 8
    # Without --model the TUI's settings file chooses the model.
    assert main(["launch"]) == 0
    assert seen["args"].model is None


def test_launch_without_the_tui_says_so_and_exits_1(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "workbench.app", None)  # import fails as if absent
    code, out, err = run_cli(capsys, "launch")
    assert code == 1
    assert "workbench.app" in err and err.count("\n") == 1
