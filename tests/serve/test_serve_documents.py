"""Answers from documents through the server (`llmos serve --index`, `documents: true`) and on the chat
page: the grounded pipeline runs behind the API, the reply carries its sources (quoted sentences with
file:line), plain requests are unchanged, and a document's text is shown as text, never markup.

The server runs the tiny random model: its replies never pass the support check, so every answer is
the best sentence, quoted, which is what these tests need to know exactly what to expect."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]

NOTES = """Operations notes

To rotate the API key, run "acmectl keys rotate --project NAME". The old key keeps
working for 24 hours, so deployed services have time to pick up the new one.

Visitors are greeted at the front desk, where <img src=x onerror=alert(1)> is written on a sign.
"""


@pytest.fixture(scope="module")
def doc_server(tiny_model, tmp_path_factory, serve_process, serve_running):
    from llmos import store
    from llmos.tasks.index import Index

    store.pull(store.DEFAULT_EMBED_MODEL, quiet=True)
    folder = tmp_path_factory.mktemp("docs")
    (folder / "notes.txt").write_text(NOTES)
    index_path = folder / "docs.sqlite"
    with Index(index_path) as index:
        index.add([folder / "notes.txt"])
    server = serve_process(str(tiny_model), "--dtype", "fp32", "--index", str(index_path),
                           log=tmp_path_factory.mktemp("logs") / "docs.log")
    with serve_running(server):
        yield server


def _ask(server, question: str, **extra) -> httpx.Response:
    with server.client() as c:
        return c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": question}],
                                                    "documents": True, **extra})


def test_documents_true_answers_with_quoted_sources(doc_server):
    r = _ask(doc_server, "How long does the old API key keep working?")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["found"] is True and body["object"] == "chat.completion"
    answer = body["choices"][0]["message"]["content"]
    source = body["sources"][0]
    assert "24 hours" in answer and "24 hours" in source["quote"]
    assert source["path"].endswith("notes.txt") and source["location"] == f"{source['path']}:{source['line_start']}-4"
    assert f"[{source['number']}]" in answer
    assert httpx.get(doc_server.url + "/health").json()["documents"] is True


def test_a_question_the_documents_do_not_answer_is_declined(doc_server):
    body = _ask(doc_server, "What is the capital of France?").json()
    content = body["choices"][0]["message"]["content"]
    assert body["found"] is False and ("do not say" in content or content.startswith("I found nothing"))


def test_documents_stream_ends_with_sources(doc_server):
    with doc_server.client() as c, c.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "How long does the old API key keep working?"}],
            "documents": True, "stream": True}) as r:
        chunks = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:") and "[DONE]" not in line]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert "24 hours" in text and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["found"] is True and "24 hours" in chunks[-1]["sources"][0]["quote"]


def test_plain_requests_are_unchanged_and_documents_needs_an_index(doc_server, tiny_server):
    with doc_server.client() as c:
        body = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}).json()
    assert "sources" not in body and "found" not in body
    r = _ask(tiny_server, "How long does the old API key keep working?")
    assert r.status_code == 400 and r.json()["error"]["param"] == "documents"
    assert "--index" in r.json()["error"]["message"]
    r = _ask(doc_server, "How long?", n=2)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_serve_refuses_a_missing_index_before_loading(tiny_model, tmp_path):
    run = subprocess.run([sys.executable, "-m", "llmos", "serve", "--model", str(tiny_model), "--index",
                          str(tmp_path / "none.sqlite")], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "--index" in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_chat_page_shows_sources_as_text(doc_server):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: install the Debian package `chromium` (make test does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_context(bypass_csp=True).new_page()
            page.set_default_timeout(60_000)
            dialogs = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(doc_server.url + "/")
            page.fill("#api-key", doc_server.key)
            page.press("#api-key", "Tab")
            page.wait_for_selector("#documents-label:not([hidden])")
            page.check("#documents")
            page.fill("#input", "What is written on the sign at the front desk?")
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.assistant .sources li")
            item = page.locator(".msg.assistant .sources li").first
            assert "notes.txt:" in item.locator(".where").text_content()
            assert "<img src=x onerror=alert(1)>" in item.locator("q").text_content()
            assert page.locator(".msg.assistant img").count() == 0 and dialogs == []
        finally:
            browser.close()
