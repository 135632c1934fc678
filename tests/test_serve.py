"""The HTTP server: the official openai client as the caller, streaming, images, errors, load."""

import base64
import concurrent.futures
import gc
import io
import json
import threading
import time

import httpx
import openai
import pytest
from PIL import Image
from serve_support import LiveServer, tiny_bundle

from chameleon_lm.serve.app import ServeConfig, create_app


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle()


@pytest.fixture(scope="module")
def live(bundle):
    config = ServeConfig(model_name="tiny", max_batch=8, max_new_tokens=480, max_image_pixels=1024 * 1024,
                         max_body_bytes=4 * 2**20)
    with LiveServer(create_app(*bundle, config)) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)


def png_url(color=(220, 20, 20), size=(40, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def decode_png(url_or_b64: str) -> Image.Image:
    data = url_or_b64.split(",", 1)[1] if url_or_b64.startswith("data:") else url_or_b64
    return Image.open(io.BytesIO(base64.b64decode(data)))


def wait_idle(live, seconds=10.0, finished: int = 0) -> dict:
    """/health once the engine is idle and (with ``finished``) has ended that many requests: the engine
    process reports after each step, so an idle report can predate a request it has not seen yet."""
    deadline = time.monotonic() + seconds
    while True:
        health = httpx.get(f"{live.url}/health").json()
        ended = sum(v for k, v in health.items() if k.startswith("finished_"))
        if (health["rows"] == 0 and health["running"] == 0 and ended >= finished) \
                or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


def test_models_health_metrics_and_viewer(live, client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert httpx.get(f"{live.url}/health").json()["status"] == "ok"
    page = httpx.get(f"{live.url}/")
    assert page.status_code == 200 and 'id="messages"' in page.text
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a red"}],
                                   max_tokens=4, seed=1)
    metrics = httpx.get(f"{live.url}/metrics").text
    assert 'chameleon_requests_total{endpoint="/v1/chat/completions",status="200"}' in metrics
    assert "chameleon_time_to_first_token_seconds_bucket" in metrics


def test_the_start_up_heap_is_frozen(live):
    """A full garbage collection over torch's objects stalled every stream for ~200 ms."""
    assert gc.get_freeze_count() > 100_000


def test_text_chat_streaming_equals_non_streaming(client):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "a red circle"}], max_tokens=20,
                  seed=7, temperature=1.0)
    whole = client.chat.completions.create(**kwargs)
    choice = whole.choices[0]
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens >= 1 and whole.usage.prompt_tokens > 1
    chunks = list(client.chat.completions.create(**kwargs, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason


def test_image_in_text_out_and_image_out(client, bundle):
    _, codec = bundle
    answer = client.chat.completions.create(
        model="tiny", max_tokens=8, seed=2,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url()}},
                                               {"type": "text", "text": "Describe the picture:"}]}])
    assert answer.usage.prompt_tokens > codec.image_seq_len  # the image's codes are in the prompt
    out = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "a green square"}], seed=3,
        extra_body={"mode": "image", "cfg_text": 2.0, "cfg_image": 1.0})
    (part,) = out.choices[0].message.content
    assert part["type"] == "image_url" and out.choices[0].finish_reason == "stop"
    image = decode_png(part["image_url"]["url"])
    assert image.size == (codec.image.resolution,) * 2
    again = client.images.generate(model="tiny", prompt="a green square", n=2, response_format="b64_json",
                                   extra_body={"seed": 3, "cfg_text": 2.0, "cfg_image": 1.0})
    first, second = (decode_png(d.b64_json) for d in again.data)
    assert first.tobytes() == image.tobytes()  # seed 3 = the chat request's image; the second used seed 4
    assert first.size == second.size


def test_image_stream_sends_progress_previews_and_the_image(live, bundle):
    n = bundle[1].image_seq_len
    body = {"model": "tiny", "stream": True, "mode": "image", "seed": 5, "image_previews": n // 4,
            "messages": [{"role": "user", "content": "a red circle"}]}
    events = []
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    progress = [c["image_progress"] for c in chunks if "image_progress" in c]
    assert [p["done"] for p in progress] == [n // 4, n // 2, 3 * n // 4, n] and progress[-1]["total"] == n
    assert any("preview" in p for p in progress)
    decode_png(next(p["preview"] for p in progress if "preview" in p))
    images = [c for c in chunks if c.get("choices") and isinstance(c["choices"][0]["delta"].get("content"), list)]
    assert len(images) == 1 and chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("body, status, fragment", [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["x"]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "mode": "video"}, 400, "mode"),
    ({"messages": [{"role": "user", "content": ""}]}, 400, "no text"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "http://example.com/a.png"}}]}]},
     400, "refused"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "/etc/passwd"}}]}]}, 400, "data: URL"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
     400, "not a readable image"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "data:text/plain,hello"}}]}]},
     400, "not an image data URL"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": png_url(size=(2000, 1000))}}]}]},
     413, "pixels"),
    ({"messages": [{"role": "user", "content": "a " * 2000}]}, 400, "tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "prompt_format": "chat", "max_tokens": 2}, 200, ""),
])
def test_bad_requests_get_4xx_json(live, body, status, fragment):
    r = httpx.post(f"{live.url}/v1/chat/completions", json={"model": "tiny", **body}, timeout=30)
    assert r.status_code == status, r.text
    if status >= 400:
        error = r.json()["error"]
        assert fragment in error["message"] and error["type"]


def test_malformed_bodies_and_paths(live):
    post = lambda path, **kw: httpx.post(f"{live.url}{path}", timeout=30, **kw)  # noqa: E731
    r = post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = post("/v1/chat/completions", content=b"x" * (5 * 2**20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(f"{live.url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = post("/v1/images/generations", json={"prompt": "x", "response_format": "url"})
    assert r.status_code == 400 and "b64_json" in r.json()["error"]["message"]
    r = post("/v1/images/generations", json={"prompt": "x", "size": "13x13"})
    assert r.status_code == 400 and "size" in r.json()["error"]["message"]
    assert httpx.get(f"{live.url}/health").json()["status"] == "ok"


def test_api_keys_and_concurrency_limit(bundle):
    config = ServeConfig(model_name="tiny", api_keys=["sekrit"], max_concurrent=1, engine_process=False)
    app = create_app(*bundle, config)
    with LiveServer(app) as server:
        r = httpx.get(f"{server.url}/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{server.url}/health").status_code == 200  # health and viewer stay open
        ok = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sekrit", max_retries=0)
        assert [m.id for m in ok.models.list()] == ["tiny"]
        headers = {"Authorization": "Bearer sekrit"}
        body = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "a"}]}
        engine = app.state.server.engine
        with engine._lock:  # the engine cannot step: the first request stays in flight
            first = concurrent.futures.ThreadPoolExecutor(1).submit(
                httpx.post, f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
            while app.state.server.inflight < 1:
                time.sleep(0.01)
            busy = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers)
            assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
        assert first.result().status_code == 200


def test_a_client_that_disconnects_frees_its_rows(live):
    before = httpx.get(f"{live.url}/health").json()
    body = {"model": "tiny", "stream": True, "max_tokens": 480, "ignore_eos": True,
            "messages": [{"role": "user", "content": "a red"}]}
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines), next(lines)  # generating: 480 tokens take far longer than reading two chunks
    ended = sum(v for k, v in before.items() if k.startswith("finished_"))
    health = wait_idle(live, finished=ended + 1)
    assert health["rows"] == 0 and health["running"] == 0
    assert health.get("finished_cancelled", 0) == before.get("finished_cancelled", 0) + 1
    assert health.get("text_tokens", 0) - before.get("text_tokens", 0) < 480  # stopped early


def test_32_concurrent_streaming_clients(live, client):
    """All complete with the outputs each gets alone, while the server stays healthy."""
    def ask(i):
        mode = ("text", "image", "interleaved")[i % 3]
        chunks = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": ["a red circle", "blue", "left"][i % 3]}],
            max_tokens=24, seed=100 + i, temperature=1.0, stream=True, extra_body={"mode": mode})
        text, images = "", 0
        for c in chunks:
            content = c.choices[0].delta.content if c.choices else None
            if isinstance(content, str):
                text += content
            elif isinstance(content, list):
                images += len(content)
        return text, images

    alone = [ask(i) for i in range(6)]  # the first few, one at a time
    healthy = []
    stop = threading.Event()

    def probe():
        while not stop.is_set():
            healthy.append(httpx.get(f"{live.url}/health", timeout=10).status_code == 200)
            time.sleep(0.1)

    watcher = threading.Thread(target=probe)
    watcher.start()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, range(32)))
    stop.set()
    watcher.join()
    assert together[:6] == alone and all(healthy) and len(healthy) >= 2
    assert sum(images for _, images in together) >= 10  # every image request made its image
    assert wait_idle(live)["rows"] == 0


def test_chameleon_serve_command_on_a_model_folder(tmp_path, bundle):
    """The console command a user runs: load a folder, serve it, answer the openai client."""
    import subprocess
    import sys

    from serve_support import free_port

    from chameleon_lm.checkpoints import save_model

    model, codec = bundle
    save_model(tmp_path / "model", model, codec.text, codec.image)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "chameleon_lm", "serve", "--model", str(tmp_path / "model"),
                             "--port", str(port), "--threads", "1", "--api-key", "k1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k1", max_retries=0)
        assert [m.id for m in api.models.list()] == ["model"]
        out = api.chat.completions.create(model="model", messages=[{"role": "user", "content": "a red"}],
                                          max_tokens=5, seed=0)
        assert out.choices[0].message.content is not None and out.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        proc.wait(20)
