"""Many clients at once, and clients that leave: the live tiny-model server."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import httpx
import pytest

CHAT = "/v1/chat/completions"
LONG = {"messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 1500}


def active(http: httpx.Client) -> int:
    text = http.get("/metrics").text
    return int(re.search(r"^llmos_active_requests (\d+)$", text, re.M).group(1))


def wait_idle(http: httpx.Client, within: float) -> float:
    """Seconds until no generation is active; fails after `within` seconds."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        if active(http) == 0 and http.get("/health").json()["active"] == 0:
            return time.monotonic() - t0
        time.sleep(0.05)
    pytest.fail(f"a generation was still active {within} s after its client left")


@pytest.fixture(scope="module")
def http(tiny_server):
    with tiny_server.client() as client:
        wait_idle(client, 30)
        yield client


def test_stream_disconnect_frees_the_slot(tiny_server, http):
    with tiny_server.client() as c, c.stream("POST", CHAT, json={**LONG, "stream": True}) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert active(http) == 1
    assert wait_idle(http, 1.0) <= 1.0


def test_non_stream_disconnect_frees_the_slot(tiny_server, http):
    def impatient():
        with pytest.raises(httpx.ReadTimeout), tiny_server.client(timeout=httpx.Timeout(30, read=0.7)) as c:
            c.post(CHAT, json=LONG)

    t = threading.Thread(target=impatient)
    t.start()
    t.join()
    assert wait_idle(http, 1.0) <= 1.0


def test_sixteen_concurrent_streams_complete_correctly(tiny_server, http):
    n = 16

    async def one(client: httpx.AsyncClient, i: int) -> tuple[list[dict], str]:
        body = {"messages": [{"role": "user", "content": f"Story number {i}"}], "max_tokens": 24, "seed": i,
                "stream": True, "stream_options": {"include_usage": True}}
        chunks, done = [], False
        async with client.stream("POST", CHAT, json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line:
                    continue
                assert line.startswith("data: ") and not done
                if line == "data: [DONE]":
                    done = True
                else:
                    chunks.append(json.loads(line[6:]))
        assert done
        plain = await client.post(CHAT, json={**body, "stream": False, "stream_options": None})
        return chunks, plain.json()["choices"][0]["message"]["content"]

    async def run():
        async with httpx.AsyncClient(base_url=tiny_server.url, headers=tiny_server.headers, timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(n)))

    seen_active = []
    watcher = threading.Thread(target=lambda: [seen_active.append(active(http)) or time.sleep(0.1) for _ in range(20)])
    watcher.start()
    results = asyncio.run(run())
    watcher.join()
    assert max(seen_active) > 1  # they really ran side by side
    for chunks, plain in results:
        assert len({c["id"] for c in chunks}) == 1
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finishes[-1] == "length" and finishes.count("length") == 1
        assert chunks[-1]["usage"]["completion_tokens"] == 24
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert text == plain  # the same seed alone gives the same text: no cross-talk between requests
    assert wait_idle(http, 5) < 5
