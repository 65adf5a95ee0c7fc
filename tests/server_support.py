"""Helpers the server tests share: waiting on the engine through /v1/engine/state. Not a test
module."""

from __future__ import annotations

import time

import httpx


def wait_idle(http: httpx.Client, timeout: float = 20.0) -> dict:
    """The engine state once nothing runs or waits and no block is held: the pool is whole."""
    deadline = time.monotonic() + timeout
    while True:
        state = http.get("/v1/engine/state").json()
        idle = not state["running"] and not state["waiting"] and not state["preempted"]
        if idle and state["kv_blocks_used"] == 0:
            return state
        assert time.monotonic() < deadline, f"engine still busy: {state['running']}"
        time.sleep(0.05)


def wait_running(http: httpx.Client, timeout: float = 20.0) -> dict:
    """The engine state once some request runs."""
    deadline = time.monotonic() + timeout
    while not (state := http.get("/v1/engine/state").json())["running"]:
        assert time.monotonic() < deadline, "the request never ran"
        time.sleep(0.02)
    return state
