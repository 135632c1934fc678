"""Fuzzing the HTTP API from its own OpenAPI schema (schemathesis): no input gives a 5xx."""

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from serve_support import LiveServer, tiny_bundle

from chameleon_lm.serve.app import ServeConfig, create_app


@pytest.fixture(scope="module")
def live():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, codec = tiny_bundle()
    # Small limits keep every generated request quick; the limits themselves get fuzzed too.
    config = ServeConfig(model_name="tiny", max_batch=4, max_new_tokens=16, default_max_tokens=16,
                         max_body_bytes=2**20, request_timeout_s=20)
    with LiveServer(create_app(model, codec, config)) as server:
        yield server
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cases(live):
    """Requests that follow the schema, and requests that break it (wrong types, missing fields, …)."""
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    return st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))


@given(data=st.data())
@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_input_gives_a_server_error(live, cases, data):
    case = data.draw(cases)
    response = case.call(base_url=live.url, timeout=30)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["type"]
    if case.path == "/health":
        assert response.json()["status"] == "ok"


def test_the_fuzzed_server_is_still_healthy(live):
    import httpx

    assert httpx.get(f"{live.url}/health").json()["status"] == "ok"
    assert httpx.get(f"{live.url}/health").json()["rows"] == 0
