"""The viewer against the real server: Chromium drives the page served by ``create_app``."""

import base64
import io

import browser_support
import httpx
import pytest
import torch
from PIL import Image
from serve_support import LiveServer, tiny_bundle

from chameleon_lm.serve.app import ServeConfig, create_app

pytestmark = browser_support.requires_browser
browser = browser_support.browser
browser_page = browser_support.browser_page


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle()


@pytest.fixture(scope="module")
def live(bundle):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with LiveServer(create_app(*bundle, ServeConfig(model_name="tiny", max_new_tokens=400, engine_process=False))) as server:
        yield server
    torch.set_num_threads(threads)


def open_viewer(page, live):
    page.goto(live.url)
    page.wait_for_function("document.getElementById('model').textContent === 'tiny'")


def test_text_answer_in_the_page_is_the_api_answer(browser_page, live):
    page = browser_page
    open_viewer(page, live)
    page.fill("#prompt", "a red circle")
    page.fill("#seed", "11")
    page.fill("#max-tokens", "24")
    page.click("#send")
    page.wait_for_selector("body[data-state=done]")
    shown = "".join(page.locator(".msg.assistant .text").all_text_contents())
    body = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "a red circle"}]}],
            "seed": 11, "max_tokens": 24, "temperature": 0.7, "top_p": 0.9, "cfg_text": 3.0, "cfg_image": 1.2,
            "mode": "text"}
    api = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=60).json()
    assert shown == api["choices"][0]["message"]["content"] and shown
    assert page.js_errors == []


def test_upload_then_image_answer_with_previews(browser_page, live, bundle, tmp_path):
    page = browser_page
    src = tmp_path / "in.png"
    Image.new("RGB", (48, 32), (0, 160, 60)).save(src)
    open_viewer(page, live)
    page.set_input_files("#file", str(src))
    page.fill("#prompt", "a green square")
    page.select_option("#mode", "image")
    page.fill("#seed", "5")
    page.click("#send")
    page.wait_for_selector("body[data-state=done]")
    final = page.locator(".msg.assistant img.image")
    assert final.count() == 1 and page.locator(".msg.assistant img.preview").count() == 0
    data = base64.b64decode(final.get_attribute("src").split(",", 1)[1])
    size = bundle[1].image.resolution
    assert Image.open(io.BytesIO(data)).size == (size, size)
    assert page.locator(".msg.user img.attachment").count() == 1
    assert page.js_errors == []


def test_cancel_frees_the_request_on_the_server(browser_page, live):
    page = browser_page
    open_viewer(page, live)
    page.fill("#prompt", "a")
    page.fill("#max-tokens", "400")
    page.fill("#temperature", "1.5")
    # Hold the engine so the request is surely still running when cancel is clicked.
    engine = live.server.config.app.state.server.engine
    with engine._lock:
        page.click("#send")
        page.wait_for_selector("body[data-state=streaming]")
        page.click("#cancel")
        page.wait_for_selector("body[data-state=cancelled]")
    deadline_ok = False
    for _ in range(100):
        health = httpx.get(f"{live.url}/health").json()
        if health["running"] == 0 and health["rows"] == 0 and health["waiting"] == 0:
            deadline_ok = True
            break
        page.wait_for_timeout(50)
    assert deadline_ok and health.get("finished_cancelled", 0) >= 1
