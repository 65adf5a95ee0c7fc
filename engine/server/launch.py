"""Running the app under uvicorn: in the foreground (`workbench serve`) or in a background thread
(tests, and later the TUI), with the bind-address safety rule checked first."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from types import FrameType, TracebackType

import uvicorn
from fastapi import FastAPI


class InsecureBindError(ValueError):
    pass


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost: assume it is reachable from outside


def check_bind(host: str, api_key: str | None, allow_insecure_public: bool) -> None:
    """Refuse to serve a non-loopback address without an API key unless explicitly allowed."""
    if is_loopback(host) or api_key or allow_insecure_public:
        return
    raise InsecureBindError(
        f"refusing to serve on {host} without an API key: anyone who can reach this address "
        f"could use the model. Pass --api-key KEY, bind 127.0.0.1, or pass "
        f"--allow-insecure-public to serve without a key anyway."
    )


class GracefulServer(uvicorn.Server):
    """uvicorn, telling the app when a shutdown begins (SIGTERM, SIGINT, or `stop`), so its open
    streams can end with an error event and [DONE] before uvicorn waits for them to close."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.notify_app()
        super().handle_exit(sig, frame)

    def notify_app(self) -> None:
        app = self.config.app
        ctx = getattr(getattr(app, "state", None), "ctx", None)
        if ctx is not None:
            ctx.begin_shutdown()


def serve(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Serve in the foreground until interrupted."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5
    )
    GracefulServer(config).run()


class BackgroundServer:
    """uvicorn on a background thread, on an already bound socket (port 0: a free port).

    with BackgroundServer(app) as server:
        httpx.get(server.url + "/health")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        self._socket = socket.socket(
            socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM
        )
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        self._server = GracefulServer(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.notify_app()
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
