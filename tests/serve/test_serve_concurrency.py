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


def batch_steps(http: httpx.Client) -> tuple[int, int]:
    """(batch-engine decode steps so far, those that decoded more than one sequence) from /metrics."""
    text = http.get("/metrics").text
    count = int(re.search(r"^llmos_batch_size_count (\d+)$", text, re.M).group(1))
    single = int(re.search(r'^llmos_batch_size_bucket\{le="1"\} (\d+)$', text, re.M).group(1))
    return count, count - single


def test_concurrent_streams_share_forward_passes(tiny_server, http):
    steps_before, shared_before = batch_steps(http)

    async def one(client: httpx.AsyncClient, i: int) -> int:
        body = {"messages": [{"role": "user", "content": f"Tell me about {i}"}], "max_tokens": 64, "seed": i,
                "stream": True}
        chunks = 0
        async with client.stream("POST", CHAT, json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                chunks += line.startswith("data: {")
        return chunks

    async def run():
        async with httpx.AsyncClient(base_url=tiny_server.url, headers=tiny_server.headers, timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(4)))

    assert all(n > 2 for n in asyncio.run(run()))
    steps, shared = batch_steps(http)
    assert steps > steps_before
    assert shared > shared_before  # some steps decoded several clients in one forward pass
    assert wait_idle(http, 5) < 5


# --- in-process: the batched path gives what the round-robin path gives ---------------------------------------


@pytest.fixture(scope="module")
def tiny_llm(tiny_model):
    import llmos

    return llmos.load(str(tiny_model), dtype="fp32")


def run_worker(worker, requests):
    """Submit every (ids, controls) at once; per request: {choice index: (text, finish, token ids)}."""

    async def one(ids, controls):
        ticket = worker.submit(ids, controls, {})
        texts, finishes = {}, {}
        async for delta in ticket:
            texts[delta.index] = texts.get(delta.index, "") + delta.text
            finishes[delta.index] = delta.finish_reason or finishes.get(delta.index)
        assert [c.text for c in ticket.run.choices] == [texts[i] for i in range(len(ticket.run.choices))]
        return {c.index: (c.text, finishes[c.index], c.token_ids) for c in ticket.run.choices}

    async def go():
        return await asyncio.gather(*(one(ids, controls) for ids, controls in requests))

    return asyncio.run(go())


def test_batched_worker_matches_round_robin(tiny_llm):
    from llmos.serve.worker import Worker

    llm = tiny_llm
    prompts = [llm.encode(f"Once upon a time, number {i},") for i in range(8)]
    solo = llm.generate("Once upon a time, number 2,", temperature=0, max_new_tokens=30)
    assert len(solo) > 8
    stop = solo[len(solo) // 2:len(solo) // 2 + 3]
    eos = llm.tokenizer.eos_id
    controls = [
        {"temperature": 0, "max_new_tokens": 30},
        {"temperature": 1.0, "seed": 7, "max_new_tokens": 30},
        {"temperature": 0, "max_new_tokens": 30, "stop": [stop]},  # ends on a stop string mid-way
        {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 3, "max_new_tokens": 25},
        {"temperature": 0, "repetition_penalty": 1.3, "presence_penalty": 0.5, "max_new_tokens": 20},
        {"temperature": 0, "logit_bias": {eos: 100.0}, "min_new_tokens": 4, "max_new_tokens": 20},  # ends on eos
        {"temperature": 0, "logprobs": 2, "max_new_tokens": 10},  # round-robin in both
        {"n": 2, "seed": 5, "max_new_tokens": 10},  # round-robin in both
    ]
    requests = list(zip(prompts, controls))
    plain = Worker(llm, max_active=8, batch=False)
    batched = Worker(llm, max_active=8)
    try:
        expected = run_worker(plain, requests)
        got = run_worker(batched, requests)
        assert got == expected
        assert expected[2][0][1] == "stop" and stop not in expected[2][0][0]
        assert expected[5][0][1] == "eos" and len(expected[5][0][2]) == 4
        sizes = batched.batch_sizes()
        assert max(sizes) > 1 and sum(sizes.values()) >= 30  # the six batchable requests shared steps
        assert plain.batch_sizes() == {} and batched.engine.idle
    finally:
        plain.stop()
        batched.stop()


def test_cancel_leaves_the_batch_engine_at_once(tiny_llm):
    from llmos.serve.worker import Worker

    worker = Worker(tiny_llm, max_active=4)
    ids = tiny_llm.encode("Go on forever.")

    async def go():
        long = worker.submit(ids, {"max_new_tokens": 1000}, {})
        other = worker.submit(ids, {"max_new_tokens": 8, "seed": 1}, {})
        assert long._request is not None and other._request is not None  # both run on the batch engine
        seen = 0
        async for delta in long:
            seen += len(delta.token_ids)
            if seen >= 5:
                break
        long.cancel()
        deadline = time.monotonic() + 1.0
        while worker.engine.rows and worker.engine.rows != [other._request] and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert long._request.finish_reason == "cancelled" and long._request not in worker.engine.rows
        texts = [d.text async for d in other]
        (choice,) = other.run.choices
        assert choice.finish_reason == "length" and len(choice.token_ids) == 8 and "".join(texts) == choice.text

    try:
        asyncio.run(go())
        assert worker.engine.idle
    finally:
        worker.stop()


def test_requests_over_the_slot_run_round_robin(tiny_llm):
    from llmos.serve.worker import Worker

    worker = Worker(tiny_llm, max_active=4, slot=32)
    ids = tiny_llm.encode("Hello there")

    async def go():
        fits = worker.submit(ids, {"max_new_tokens": 8, "seed": 2}, {})
        over = worker.submit(ids, {"max_new_tokens": 40, "seed": 2}, {})
        assert fits._request is not None and over._request is None  # prompt + 40 tokens exceeds the 32-slot
        async def drain(ticket):
            return [delta async for delta in ticket]

        await asyncio.gather(drain(fits), drain(over))
        return fits.run.choices[0], over.run.choices[0]

    try:
        short, long = asyncio.run(go())
        assert (len(short.token_ids), len(long.token_ids)) == (8, 40)
        assert long.token_ids[:8] == short.token_ids  # the same seed, one through each path
    finally:
        worker.stop()
