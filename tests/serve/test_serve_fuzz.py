"""Schema fuzzing: schemathesis drives a live `llmos serve` (loopback, behind a key) from the server's
own /openapi.json, with valid and invalid requests for every documented operation. No response may
be a 5xx, every response must match the documented schema (errors: the OpenAI envelope), and the
server must still be healthy afterwards.

Bounded to fit `make test` on two cores: EXAMPLES cases per operation, each against a tiny random
Llama whose context is CONTEXT tokens, so no generated request, however large its max_tokens or n,
can keep the model busy for long (larger ones are refused as over the context)."""

from __future__ import annotations

import json
import shutil

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from llmos.serve.endpoints import openapi_document
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES = 25
CONTEXT = 96
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
STATS = {"cases": 0, "by_status": {}}


@pytest.fixture(scope="module")
def fuzz_server(tiny_model, tmp_path_factory, serve_process):
    folder = tmp_path_factory.mktemp("fuzz") / "short-context"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": CONTEXT}))
    server = serve_process(str(folder), "--dtype", "fp32", "--max-body-bytes", str(256 << 10),
                           "--max-active", "4", "--max-queue", "8", log=tmp_path_factory.mktemp("logs") / "fuzz.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


# The document the app serves at /openapi.json (checked equal below), loaded at collection time:
# schemathesis' fixture-based lazy loader does not run under pytest 9.
schema = schemathesis.openapi.from_dict(openapi_document())


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_request_breaks_the_server(case, fuzz_server):
    response = case.call_and_validate(base_url=fuzz_server.url, headers=fuzz_server.headers, checks=CHECKS, timeout=60)
    STATS["cases"] += 1
    STATS["by_status"][response.status_code] = STATS["by_status"].get(response.status_code, 0) + 1
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        assert "Traceback" not in body["error"]["message"]


def test_still_serving_after_the_fuzzing(fuzz_server):
    with fuzz_server.client() as client:
        assert client.get("/health").json()["status"] == "ok"
        assert client.get("/openapi.json").json() == openapi_document()
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200, r.text
    print(f"schema fuzzing: {STATS['cases']} cases, by status {dict(sorted(STATS['by_status'].items()))}")
