"""Schemathesis against the server's own OpenAPI schema: generated requests (valid and not) to every
route must never get a 5xx, and every answer must match the schema (status code, content type,
body). Bounded to a few dozen examples per route so it stays fast."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.config import SchemathesisConfig

from engine import AsyncLLM
from engine.server import BackgroundServer, ServerSettings, create_app

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def fuzz_server(llama_checkpoint) -> Iterator[BackgroundServer]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    llm = AsyncLLM(str(llama_checkpoint), block_size=4, max_model_len=64, max_num_seqs=16)
    app = create_app(llm, ServerSettings(model_name="tiny", api_key=KEY, max_queue=64))
    with BackgroundServer(app) as running:
        yield running
    llm.shutdown()
    torch.set_num_threads(threads)


@pytest.fixture
def api_schema(fuzz_server):
    # The documented examples, then generated requests (valid and invalid); the coverage phase's
    # hundreds of boundary cases per route would cost more than the rest of the suite.
    config = SchemathesisConfig.from_dict({"phases": {"coverage": {"enabled": False}}})
    return schemathesis.openapi.from_url(
        fuzz_server.url + "/openapi.json", headers=AUTH, config=config
    )


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=40,
    derandomize=True,  # the same examples on every run: CI stays deterministic
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors_and_no_schema_violations(case, fuzz_server):
    case.call_and_validate(base_url=fuzz_server.url, headers=AUTH, checks=CHECKS, timeout=60)
