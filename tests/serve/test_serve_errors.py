"""Every error case over raw HTTP: status, the OpenAI envelope, and a normal request succeeding after.

Most run against the live tiny-model server; cases that need a failure inside the engine, a full
queue or CORS settings run the same app in-process (httpx's ASGI transport) with a real tiny model.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading

import httpx
import pytest

from llmos.serve.app import ServeConfig, create_app

CHAT = "/v1/chat/completions"
OK_BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
MSGS = [{"role": "user", "content": "hi"}]


def envelope(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


@pytest.fixture(scope="module")
def http(tiny_server):
    with tiny_server.client() as client:
        yield client
        # the server is still healthy after everything this module threw at it
        assert client.get("/health").json()["status"] == "ok"


def still_works(http: httpx.Client) -> None:
    r = http.post(CHAT, json=OK_BODY)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("body, param", [
    (b'{"messages": [', None),                                              # malformed JSON
    (b"", None),                                                            # empty body
    (b"[1, 2]", None),                                                      # not an object
    (b'"text"', None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', None),
])
def test_unparseable_bodies_are_400(http, body, param):
    envelope(http.post(CHAT, content=body, headers={"content-type": "application/json"}), 400, param=param)
    still_works(http)


@pytest.mark.parametrize("extra, param", [
    ({"temperature": "hot"}, "temperature"),                                # wrong type
    ({"temperature": 2.5}, "temperature"),                                  # out of range
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"top_p": -0.1}, "top_p"),
    ({"top_p": 0}, "top_p"),                                                # refused by llmos' own validation
    ({"stop": ["a", ""]}, "stop"),
    ({"n": 9}, "n"),                                                        # over the limit
    ({"top_logprobs": 3}, "top_logprobs"),                                  # needs logprobs
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"stop": [str(i) for i in range(17)]}, "stop"),                        # more than 16 stop strings
    ({"stop": ""}, "stop"),
    ({"stop": 5}, "stop"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"seed": "1"}, "seed"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),        # without stream
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
     "response_format.json_schema.schema"),
])
def test_invalid_parameters_are_400_naming_the_parameter(http, extra, param):
    envelope(http.post(CHAT, json={**OK_BODY, **extra}), 400, param=param)


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),                                                       # empty
    ("hi", "messages"),
    ([{"role": "wizard", "content": "hi"}], "messages[0].role"),            # unknown role
    ([{"role": "user", "content": "a"}, {"role": "user", "content": 3}], "messages[1].content"),
    ([{"role": "user"}], "messages[0].content"),                            # no content at all
    ([{"role": "assistant", "content": None}], "messages[0].content"),
    ([{"content": "hi"}], "messages[0].role"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0].type"),
])
def test_bad_messages_are_400(http, messages, param):
    envelope(http.post(CHAT, json={"messages": messages}), 400, param=param)
    still_works(http)


def test_missing_messages_and_prompt(http):
    envelope(http.post(CHAT, json={"model": "x"}), 400, code="missing_required_parameter", param="messages")
    envelope(http.post("/v1/completions", json={}), 400, param="prompt")
    envelope(http.post("/v1/completions", json={"prompt": [], "max_tokens": 1}), 400, param="prompt")
    envelope(http.post("/v1/completions", json={"prompt": [10 ** 9], "max_tokens": 1}), 400, param="prompt")
    envelope(http.post("/v1/embeddings", json={"input": []}), 400, param="input")
    envelope(http.post("/tokenize", json={}), 400)
    envelope(http.post("/detokenize", json={"tokens": [-1]}), 400, param="tokens")
    still_works(http)


def test_context_length_exceeded_names_both_counts(http):
    e = envelope(http.post(CHAT, json={**OK_BODY, "max_tokens": 5000}), 400, code="context_length_exceeded")
    prompt = http.post("/tokenize", json={"messages": MSGS}).json()["count"]
    assert "2048" in e["message"] and "5000" in e["message"] and str(prompt) in e["message"]
    long_prompt = {"messages": [{"role": "user", "content": "word " * 2100}]}
    e = envelope(http.post(CHAT, json=long_prompt), 400, code="context_length_exceeded")
    assert "2048" in e["message"]
    e = envelope(http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4000}), 400, code="context_length_exceeded")
    still_works(http)


def test_auth(tiny_server, http):
    bare = httpx.Client(base_url=tiny_server.url, timeout=30)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": tiny_server.key},
                    {"Authorization": f"Basic {tiny_server.key}"}):
        for method, path in (("POST", CHAT), ("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/openapi.json"),
                             ("POST", "/tokenize"), ("POST", "/v1/embeddings"), ("GET", "/nowhere")):
            envelope(bare.request(method, path, headers=headers, json=OK_BODY), 401, code="invalid_api_key")
    assert bare.get("/health").status_code == 200
    for page in ("/", "/static/app.js", "/static/style.css"):
        r = bare.get(page)
        assert r.status_code == 200 and "default-src 'self'" in r.headers["content-security-policy"]
    still_works(http)


def test_unknown_models_are_404_and_never_touch_the_filesystem(http):
    for name in ("gpt-4", "../../etc/passwd", "/etc/passwd", "smollm2-135m-instruct", "all-minilm-l6-v2x"):
        envelope(http.post(CHAT, json={**OK_BODY, "model": name}), 404, code="model_not_found", param="model")
        envelope(http.post("/v1/completions", json={"prompt": "a", "model": name}), 404, code="model_not_found")
        envelope(http.get(f"/v1/models/{name}"), 404)
    envelope(http.post("/v1/embeddings", json={"input": "a", "model": "nope"}), 404, code="model_not_found")
    envelope(http.post(CHAT, json={**OK_BODY, "model": "all-minilm-l6-v2"}), 400, param="model")
    still_works(http)


def test_unknown_route_and_method(http):
    envelope(http.get("/v1/nothing"), 404)
    envelope(http.get(CHAT), 405)
    envelope(http.get("/static/../../etc/passwd"), 404)
    still_works(http)


def test_body_over_the_cap_is_413(http):
    big = {"messages": [{"role": "user", "content": "x" * (1 << 20)}]}  # the server's cap is 1 MiB
    envelope(http.post(CHAT, json=big), 413, code="request_too_large")

    def chunks():  # no Content-Length: the cap is enforced while reading
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}]}'

    envelope(http.post(CHAT, content=chunks(), headers={"content-type": "application/json"}), 413)
    still_works(http)


def test_cors_is_off_by_default(http):
    r = http.options(CHAT, headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    r = http.post(CHAT, json=OK_BODY, headers={"Origin": "http://evil.example"})  # a foreign page's fetch
    envelope(r, 403, code="origin_not_allowed", param="origin")
    assert "access-control-allow-origin" not in r.headers


def test_non_loopback_bind_needs_a_key():
    env = {k: v for k, v in os.environ.items() if k != "LLMOS_API_KEY"}
    out = subprocess.run([sys.executable, "-m", "llmos", "serve", "--host", "0.0.0.0", "--port", "1"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 1 and "API key" in out.stderr


# --- in-process: engine failures, queue full, CORS on ----------------------------------------------------


def in_process(tiny_model, **config):
    """The app with the tiny model loaded synchronously (no uvicorn)."""
    app = create_app(ServeConfig(model=str(tiny_model), dtype="fp32", **config), load=False)
    server = app.state.server
    server._load()
    assert server.status == "ok", server.error
    return app, server


def test_errors_inside_generation(tiny_model, monkeypatch):
    """A failure inside the engine: 500 envelope before streaming, an error event then [DONE] after."""
    monkeypatch.setenv("LLMOS_NATIVE", "0")  # the Python step, where the failure is injected
    app, server = in_process(tiny_model)
    real_hidden = server.llm.model.hidden
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated engine failure")
        return real_hidden(*args, **kwargs)

    server.llm.model.hidden = flaky

    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            r = await client.post(CHAT, json={**OK_BODY, "max_tokens": 10, "stream": True})
            assert r.status_code == 200
            events = [line[6:] for line in r.text.split("\n\n") if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            assert '"error"' in events[-2] and "simulated engine failure" in events[-2]
            calls["n"] = 1
            envelope(await client.post(CHAT, json={**OK_BODY, "max_tokens": 10}), 500, code="internal_error")
            calls["n"] = -10 ** 6
            r = await client.post(CHAT, json=OK_BODY)
            assert r.status_code == 200

            def broken(*a, **k):
                raise KeyError("a bug")

            saved, server.llm.chat_ids = server.llm.chat_ids, broken
            envelope(await client.post(CHAT, json=OK_BODY), 500, code="internal_error")
            server.llm.chat_ids = saved
            assert (await client.post(CHAT, json=OK_BODY)).status_code == 200
        server.shutdown()

    asyncio.run(go())


def test_queue_full_is_503_with_retry_after(tiny_model):
    app, server = in_process(tiny_model, max_active=1, max_queue=1)
    ids = server.llm.encode("hello")

    async def go():
        running = server.worker.submit(ids, {"max_new_tokens": 1000}, {})
        waiting = server.worker.submit(ids, {"max_new_tokens": 1000}, {})
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            r = await client.post(CHAT, json=OK_BODY)
            envelope(r, 503, code="server_overloaded")
            assert int(r.headers["retry-after"]) >= 1
            running.cancel()
            waiting.cancel()
            for _ in range(100):
                if server.worker.active == 0 and server.worker.queue_depth == 0:
                    break
                await asyncio.sleep(0.05)
            assert (await client.post(CHAT, json=OK_BODY)).status_code == 200
        server.shutdown()

    asyncio.run(go())


def test_health_is_503_while_loading_and_cors_when_listed(tiny_model):
    app = create_app(ServeConfig(model=str(tiny_model), dtype="fp32", cors_origins=("http://ok.example",)), load=False)

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            r = await client.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "loading"
            envelope(await client.post(CHAT, json=OK_BODY), 503, code="model_loading")
            r = await client.options(CHAT, headers={"Origin": "http://ok.example", "Access-Control-Request-Method": "POST"})
            assert r.headers["access-control-allow-origin"] == "http://ok.example"
            r = await client.options(CHAT, headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
            assert "access-control-allow-origin" not in r.headers

    asyncio.run(go())


def test_sigterm_finishes_in_flight_streams_then_exits(tiny_model, tmp_path, serve_process):
    server = serve_process(str(tiny_model), "--dtype", "fp32", log=tmp_path / "sigterm.log")
    server.wait_ready()
    lines: list[str] = []
    started = threading.Event()

    def stream():
        with server.client() as c, c.stream("POST", CHAT, json={**OK_BODY, "max_tokens": 150, "stream": True}) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    started.set()

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(60)
    server.proc.terminate()  # SIGTERM mid-stream
    t.join(120)
    assert lines[-1] == "data: [DONE]"
    assert any('"finish_reason":"length"' in line for line in lines)
    # uvicorn re-raises the signal once it has shut down gracefully: the exit is "terminated by SIGTERM"
    assert server.proc.wait(60) in (0, -signal.SIGTERM)
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=5)


def test_one_route_table_drives_docs_auth_and_metrics(tiny_server, http):
    """/openapi.json documents the JSON routes (all but /health behind the key), and /metrics counts
    each route under its own label: the page at /index.html too, a model id under its template."""
    doc = http.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/models/{model}", "/tokenize",
            "/detokenize", "/health", "/metrics"} <= set(doc["paths"])
    assert "security" not in doc["paths"]["/health"]["get"] and doc["paths"]["/tokenize"]["post"]["security"]
    bare = httpx.Client(base_url=tiny_server.url, timeout=30)
    assert bare.get("/index.html").status_code == 200  # public, like / and the static files
    http.get("/v1/models/some/name")
    text = http.get("/metrics").text
    assert 'llmos_requests_total{route="/index.html",status="200"}' in text
    assert 'llmos_requests_total{route="/v1/models/{model}",status="404"}' in text
