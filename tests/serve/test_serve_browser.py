"""The web chat page in headless Chromium (the Debian package), driven by Playwright.

The first test talks to the live tiny-model server end to end: its random weights rarely emit an end
token, so a reply streams for a long time, which is what the stop button needs. The second checks
that hostile model output is shown as text: no model can be made to produce an exact string on
demand, so that test answers the page's request with a canned event stream (Playwright's request
interception) carrying `<img src=x onerror=...>` and a `javascript:` link, split across chunks as a
real stream would split them, then reloads to check the stored conversation renders safely too.
"""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: install the Debian package `chromium` (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, tiny_server):
    # Without the page's Content-Security-Policy: Playwright's waits evaluate strings, and the XSS
    # check below must hold by escaping alone, not because CSP blocks inline handlers.
    context = browser.new_context(bypass_csp=True)
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    pg.goto(tiny_server.url + "/")
    pg.fill("#api-key", tiny_server.key)
    pg.press("#api-key", "Tab")  # `change` fires: the key is saved and the models load
    pg.wait_for_function("document.querySelector('#model').options.length > 0")
    yield pg
    context.close()


def active(tiny_server) -> int:
    return httpx.get(tiny_server.url + "/health", timeout=10).json()["active"]


def test_chat_streams_stops_and_survives_a_reload(page, tiny_server):
    page.fill("#input", "Hello there")
    page.press("#input", "Enter")
    reply = page.locator(".msg.assistant .content").last
    page.wait_for_function("document.querySelectorAll('.msg.assistant .content')[0].textContent.length > 0")
    first = len(reply.text_content())
    page.wait_for_function(f"document.querySelectorAll('.msg.assistant .content')[0].textContent.length > {first + 20}")
    assert page.is_visible("#stop") and page.is_disabled("#send")  # still streaming, token by token
    page.click("#stop")
    page.wait_for_selector("#stop", state="hidden")
    assert page.text_content(".msg.assistant .note") == "(stopped)"
    stopped_text = reply.text_content()
    t0 = time.monotonic()
    while active(tiny_server) and time.monotonic() - t0 < 2:
        time.sleep(0.05)
    assert active(tiny_server) == 0  # the server dropped the generation

    page.reload()
    page.wait_for_selector(".msg.assistant")
    assert page.text_content("#conversations li.current .open") == "Hello there"
    assert page.text_content(".msg.user .content") == "Hello there"
    assert page.text_content(".msg.assistant .content") == stopped_text
    assert page.eval_on_selector("#api-key", "e => e.value") == tiny_server.key

    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and page.locator("#conversations li").count() == 2


def sse_body(pieces: list[str]) -> str:
    chunks = [{"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": "m",
               "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
    chunks += [{"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
    chunks.append({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


EVIL = "<img src=x onerror=alert(1)>"


def test_model_output_is_never_html(page):
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    pieces = ["Here is **bold** and `<b>code</b>`: <img src=x ", "onerror=alert(1)>", "\n\n[click](javascript:alert(2)) ",
              "[ok](https://example.org/?a=1&b=\"x\") <script>alert(3)</script>\n\n- item <i>one</i>\n\n```\n<svg onload=alert(4)>\n```"]
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"content-type": "text/event-stream"}, body=sse_body(pieces)))
    page.fill("#input", "Say something nasty")
    page.press("#input", "Enter")
    page.wait_for_selector("#stop", state="hidden")

    def check():
        content = page.locator(".msg.assistant .content").last
        text = content.text_content()
        assert EVIL in text and "<script>alert(3)</script>" in text and "<svg onload=alert(4)>" in text
        for tag in ("img", "script", "svg", "i", "b"):
            assert content.locator(tag).count() == 0, tag
        assert content.locator("strong").text_content() == "bold"
        assert content.locator("code").first.text_content() == "<b>code</b>"
        links = content.locator("a")
        assert links.count() == 1 and links.get_attribute("href") == 'https://example.org/?a=1&b="x"'
        assert content.locator("li").text_content() == "item <i>one</i>"

    check()
    page.unroute("**/v1/chat/completions")
    page.reload()
    page.wait_for_selector(".msg.assistant")
    check()
    page.wait_for_timeout(200)
    assert dialogs == []
