"""`workbench serve`: the bind-address rule, its options, and the real command serving over HTTP
in a subprocess."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from engine.server import InsecureBindError, check_bind
from engine.server.context import DEFAULT_MAX_REQUEST_BYTES
from engine.server.tool_parsers import PARSERS
from workbench import serve_cmd

ROOT = Path(__file__).resolve().parent.parent
# The two lines workbench/cli.py needs, in a stand-alone parser.
MAIN = (
    "import argparse, sys\n"
    "from workbench import serve_cmd\n"
    "parser = argparse.ArgumentParser(prog='workbench')\n"
    "serve_cmd.add_parser(parser.add_subparsers(dest='command'))\n"
    "args = parser.parse_args(sys.argv[1:])\n"
    "sys.exit(args.func(args))\n"
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="workbench")
    serve_cmd.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_needs_no_key(host):
    check_bind(host, None, allow_insecure_public=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com"])
def test_public_address_needs_a_key_or_the_explicit_flag(host):
    with pytest.raises(InsecureBindError, match="--allow-insecure-public"):
        check_bind(host, None, allow_insecure_public=False)
    check_bind(host, "secret", allow_insecure_public=False)
    check_bind(host, None, allow_insecure_public=True)


def test_options_and_refusal_before_the_model_loads(monkeypatch):
    monkeypatch.delenv(serve_cmd.API_KEY_ENV, raising=False)
    args = parse()
    assert (args.host, args.port, args.api_key, args.max_queue) == ("127.0.0.1", 8000, None, 256)
    assert (
        args.max_request_bytes == serve_cmd.DEFAULT_MAX_REQUEST_BYTES == DEFAULT_MAX_REQUEST_BYTES
    )
    assert args.tool_call_parser is None
    assert set(serve_cmd.TOOL_CALL_PARSERS) == set(PARSERS)
    assert parse("--tool-call-parser", "hermes").tool_call_parser == "hermes"
    assert args.func is serve_cmd.run
    refused = parse("--host", "0.0.0.0", "--model", "/no/such/model")
    with pytest.raises(InsecureBindError):  # not a model-loading error: checked first
        serve_cmd.run(refused)
    with pytest.raises(ValueError, match="--max-queue"):
        serve_cmd.run(parse("--max-queue", "-5", "--model", "/no/such/model"))
    with pytest.raises(ValueError, match="--max-request-bytes"):
        serve_cmd.run(parse("--max-request-bytes", "0", "--model", "/no/such/model"))
    monkeypatch.setenv(serve_cmd.API_KEY_ENV, "from-env")
    assert parse().api_key == "from-env"


def test_serve_command_answers_over_http(llama_checkpoint):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [
        "serve",
        "--model",
        str(llama_checkpoint),
        "--port",
        str(port),
        "--api-key",
        "k",
        "--served-model-name",
        "tiny",
        "--max-model-len",
        "64",
        "--log-level",
        "warning",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", MAIN, *argv], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, "workbench serve exited"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "workbench serve did not come up"
            time.sleep(0.2)
        auth = {"Authorization": "Bearer k"}
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers=auth).json()["data"][0]["id"] == "tiny"
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 3}
        done = httpx.post(url + "/v1/completions", json=body, headers=auth, timeout=60)
        assert done.json()["usage"]["completion_tokens"] >= 1
        # SIGTERM with a stream open: the stream ends with an error event and [DONE].
        long = {**body, "max_tokens": 60, "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream(
            "POST", url + "/v1/completions", json=long, headers=auth, timeout=60
        ) as response:
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[len("data: ") :])
                if len(events) == 2:
                    proc.send_signal(signal.SIGTERM)
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "server_shutdown"
        assert len(events) < 60
        # uvicorn re-raises the signal once its graceful shutdown is done.
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
