"""The web viewer (serve/static/index.html) driven in a real headless Chromium.

A small stub HTTP server stands in for ``chameleon serve``: it serves the page at ``/`` and
speaks the same OpenAI-style API (``GET /v1/models``, streaming ``POST /v1/chat/completions``),
so the page is exercised without a model. What the page sent is recorded for the asserts.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import browser_support
import pytest
from PIL import Image

pytestmark = browser_support.requires_browser
browser = browser_support.browser              # fixtures: one Chromium per module,
browser_page = browser_support.browser_page    # a fresh page per test

PAGE = Path(__file__).resolve().parents[1] / "src" / "chameleon_lm" / "serve" / "static" / "index.html"
MODEL = "stub-model"


def png_data_url(color, size=(16, 16)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


PREVIEW = png_data_url((200, 200, 200))
FINAL = png_data_url((255, 0, 0))


class Stub:
    """Shared state between the test and the handler threads."""

    def __init__(self):
        self.requests: list[dict] = []      # JSON bodies of POST /v1/chat/completions
        self.headers: list[dict] = []       # their headers
        self.model_auth: list[str | None] = []
        self.closed = threading.Event()     # the client went away mid-stream
        self.preview_hold = 0.6             # seconds the normal script waits after a preview


def make_handler(stub: Stub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"   # the body ends when the connection closes

        def log_message(self, *args):   # keep pytest output clean
            pass

        def _json(self, status, obj):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/" or self.path.startswith("/?"):
                data = PAGE.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            elif self.path == "/v1/models":
                stub.model_auth.append(self.headers.get("Authorization"))
                self._json(200, {"object": "list", "data": [
                    {"id": MODEL, "object": "model", "created": 0, "owned_by": "chameleon-lm"}]})
            else:
                self._json(404, {"error": {"message": "no such path", "type": "not_found",
                                           "param": None, "code": None}})

        def do_POST(self):
            if self.path != "/v1/chat/completions":
                return self._json(404, {"error": {"message": "no such path", "type": "not_found",
                                                  "param": None, "code": None}})
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            stub.requests.append(body)
            stub.headers.append(dict(self.headers))
            prompt = last_user_text(body)
            if prompt == "bad":
                return self._json(400, {"error": {"message": "prompt is bad: try another",
                                                  "type": "invalid_request_error",
                                                  "param": "messages", "code": None}})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            try:
                if prompt == "slow":
                    self._slow()
                elif prompt == "oops":
                    self._chunk({"role": "assistant"})
                    self._chunk({"content": "partial"})
                    self._send({"error": {"message": "the model fell over", "type": "server_error",
                                          "code": 500}})
                else:
                    self._script(body)
            except (BrokenPipeError, ConnectionResetError):
                stub.closed.set()

        def _send(self, obj):
            payload = obj if isinstance(obj, str) else json.dumps(obj)
            self.wfile.write(f"data: {payload}\n\n".encode())
            self.wfile.flush()

        def _chunk(self, delta, finish=None, **extra):
            self._send({"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0,
                        "model": MODEL,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                        **extra})

        def _script(self, body):
            self._chunk({"role": "assistant"})
            self._chunk({"content": "Hello"})
            self._chunk({"content": " world"})
            self._chunk({}, image_progress={"index": 0, "done": 256, "total": 1024,
                                            "preview": PREVIEW})
            time.sleep(stub.preview_hold)   # long enough for the test to see the preview
            self._chunk({"content": [{"type": "image_url", "image_url": {"url": FINAL}}]})
            self._chunk({}, finish="stop")
            self._send("[DONE]")

        def _slow(self):
            self._chunk({"role": "assistant"})
            for i in range(50):             # at most 10 s, then it stops by itself
                self._chunk({"content": f"tick{i} "})
                time.sleep(0.2)
            self._chunk({}, finish="stop")
            self._send("[DONE]")

    return Handler


def last_user_text(body) -> str:
    for msg in reversed(body.get("messages", [])):
        if msg.get("role") == "user":
            content = msg["content"]
            if isinstance(content, str):
                return content
            return "".join(p.get("text", "") for p in content if p.get("type") == "text")
    return ""


@pytest.fixture
def stub():
    state = Stub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def open_page(page, stub):
    page.goto(stub.url)
    page.wait_for_function(f"document.getElementById('model').textContent === {MODEL!r}")
    assert page.get_attribute("body", "data-state") == "idle"


def test_defaults_and_model_name(browser_page, stub):
    page = browser_page
    open_page(page, stub)
    assert page.input_value("#mode") == "text"
    assert page.input_value("#max-tokens") == "256"
    assert float(page.input_value("#temperature")) == 0.7
    assert float(page.input_value("#top-p")) == 0.9
    assert page.input_value("#seed") == ""
    assert float(page.input_value("#cfg-text")) == 3.0
    assert float(page.input_value("#cfg-image")) == 1.2
    assert page.is_disabled("#cancel") and page.is_enabled("#send")
    assert stub.model_auth == [None]
    assert page.js_errors == []


def test_stream_text_preview_and_image(browser_page, stub, tmp_path):
    page = browser_page
    src = tmp_path / "cat.png"
    Image.new("RGB", (8, 8), (0, 128, 255)).save(src)
    open_page(page, stub)

    page.fill("#prompt", "draw a cat")
    page.set_input_files("#file", str(src))
    page.wait_for_selector("#attachment img[src^='data:image/png;base64,']")   # thumbnail
    page.select_option("#mode", "interleaved")
    page.fill("#seed", "123")
    page.click("#send")

    # The preview shows while the image is in progress, with the progress in the status line.
    page.wait_for_selector(".msg.assistant img.preview")
    assert page.text_content("#status") == "image 1: 256/1024"
    assert page.get_attribute("body", "data-state") == "streaming"
    assert page.is_enabled("#cancel") and page.is_disabled("#send")

    page.wait_for_selector("body[data-state=done]")
    assistant = page.locator(".msg.assistant")
    assert assistant.count() == 1
    assert "".join(assistant.locator(".text").all_text_contents()) == "Hello world"
    assert assistant.locator("img.image").count() == 1
    assert assistant.locator("img.preview").count() == 0
    assert assistant.locator("img.image").get_attribute("src") == FINAL
    # text first, then the image: arrival order
    order = page.eval_on_selector(".msg.assistant", "e => [...e.children].map(c => c.className)")
    assert order == ["text", "image"]
    assert page.text_content("#status") == "done"
    assert page.is_disabled("#cancel") and page.is_enabled("#send")
    user = page.locator(".msg.user")
    assert user.locator(".text").text_content() == "draw a cat"
    assert user.locator("img.attachment").count() == 1
    assert page.locator("#attachment").is_hidden()      # attachment cleared after sending

    (body,) = stub.requests
    assert body["stream"] is True
    assert body["model"] == MODEL
    assert body["mode"] == "interleaved"
    assert body["max_tokens"] == 256
    assert body["temperature"] == 0.7 and body["top_p"] == 0.9
    assert body["seed"] == 123
    assert body["cfg_text"] == 3.0 and body["cfg_image"] == 1.2
    assert body["image_previews"] == 128
    assert [m["role"] for m in body["messages"]] == ["user"]
    image_part, text_part = body["messages"][0]["content"]
    assert text_part == {"type": "text", "text": "draw a cat"}
    assert image_part["type"] == "image_url"
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == src.read_bytes()
    assert "Authorization" not in stub.headers[0]
    assert page.js_errors == []


def test_history_api_key_and_enter(browser_page, stub):
    page = browser_page
    stub.preview_hold = 0.0
    open_page(page, stub)
    page.fill("#api-key", "sekret")
    page.fill("#prompt", "first")
    page.press("#prompt", "Enter")
    page.wait_for_selector("body[data-state=done]")
    first = stub.requests[0]
    assert "seed" not in first                      # blank seed = random: omitted
    assert first["mode"] == "text"
    assert first["messages"] == [{"role": "user", "content": [{"type": "text", "text": "first"}]}]

    # Shift+Enter is a newline, not a send.
    page.click("#prompt")
    page.keyboard.type("line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    assert page.input_value("#prompt") == "line one\nline two"
    assert len(stub.requests) == 1
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 2"
                           " && document.body.dataset.state === 'done'")

    second = stub.requests[1]
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
    assistant_turn = second["messages"][1]["content"]
    assert assistant_turn == [{"type": "text", "text": "Hello world"},
                              {"type": "image_url", "image_url": {"url": FINAL}}]
    assert second["messages"][2]["content"] == [{"type": "text", "text": "line one\nline two"}]
    for headers in stub.headers:
        assert headers["Authorization"] == "Bearer sekret"
    assert page.js_errors == []


def test_cancel_aborts_the_stream(browser_page, stub):
    page = browser_page
    open_page(page, stub)
    page.fill("#prompt", "slow")
    page.click("#send")
    page.wait_for_selector(".msg.assistant .text")   # a delta or two arrived
    assert page.get_attribute("body", "data-state") == "streaming"
    assert page.is_enabled("#cancel")
    page.click("#cancel")
    page.wait_for_selector("body[data-state=cancelled]")
    assert page.text_content("#status") == "cancelled"
    assert page.is_disabled("#cancel") and page.is_enabled("#send")
    assert stub.closed.wait(5), "the stub never saw the connection close"
    assert page.js_errors == []


def test_http_error_message_is_shown(browser_page, stub):
    page = browser_page
    open_page(page, stub)
    page.fill("#prompt", "bad")
    page.click("#send")
    page.wait_for_selector("body[data-state=error]")
    assert "prompt is bad: try another" in page.text_content("#status")
    assert page.is_enabled("#send") and page.is_disabled("#cancel")
    # the failed turn is not sent back with the next request
    stub.preview_hold = 0.0
    page.fill("#prompt", "again")
    page.click("#send")
    page.wait_for_selector("body[data-state=done]")
    assert [m["role"] for m in stub.requests[1]["messages"]] == ["user"]
    assert page.js_errors == []


def test_error_chunk_during_stream(browser_page, stub):
    page = browser_page
    open_page(page, stub)
    page.fill("#prompt", "oops")
    page.click("#send")
    page.wait_for_selector("body[data-state=error]")
    assert "the model fell over" in page.text_content("#status")
    assert page.locator(".msg.assistant .text").text_content() == "partial"
    assert page.js_errors == []
