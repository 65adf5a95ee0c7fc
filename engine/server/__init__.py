"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over `AsyncLLM`.

from engine.server import ServerSettings, create_app, serve
serve(create_app(AsyncLLM("tiny"), ServerSettings(model_name="tiny")), "127.0.0.1", 8000)
"""

from __future__ import annotations

from engine.server.app import create_app
from engine.server.context import ServerSettings
from engine.server.launch import BackgroundServer, InsecureBindError, check_bind, serve

__all__ = [
    "BackgroundServer",
    "InsecureBindError",
    "ServerSettings",
    "check_bind",
    "create_app",
    "serve",
]
