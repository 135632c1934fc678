"""``chameleon eval generate``: prompt sets, the results store, and the three answerers.

The augmented baseline runs against a stub OpenAI-compatible server (FastAPI under uvicorn on a
loopback port: real HTTP through the official client) that writes ``<caption>`` tags and draws one
solid-colour image per caption; the endpoint answerer runs against the real ``chameleon serve`` app.
"""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from serve_support import LiveServer, tiny_bundle

from chameleon_lm.cli import main
from chameleon_lm.eval.generate import CAPTION_SUFFIX, AugmentedAnswerer, EndpointAnswerer, run_generation
from chameleon_lm.eval.prompts import Prompt, PromptSet, export_meta, import_meta, shapes_prompt_set
from chameleon_lm.eval.store import ResultStore

pytestmark = pytest.mark.usefixtures("one_thread")


def _png(colour) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def stub_app(seen: list):
    """A text endpoint that answers with captions, and an images endpoint drawing each caption."""
    app = FastAPI()
    colours = {"red": (255, 0, 0), "blue": (0, 0, 255)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append(("chat", body))
        text = " ".join(p["text"] for p in body["messages"][-1]["content"] if p["type"] == "text")
        if "fail" in text:
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        answer = ("Here you go: <caption>a red circle</caption> and then <caption>a blue square"
                  "</caption> done." if "draw" in text else "Just text.")
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": answer}}]}

    @app.post("/v1/images/generations")
    async def images(request: Request):
        body = await request.json()
        seen.append(("image", body))
        colour = next(c for name, c in colours.items() if name in body["prompt"])
        return {"created": 0, "data": [{"b64_json": _png(colour)}]}

    return app


def test_prompt_sets_round_trip_and_bad_lines_are_refused(tmp_path):
    ps = shapes_prompt_set(tmp_path / "set", per_category=2)
    assert ps.summary()["output"] == {"image": 2, "mixed": 2, "text": 2}
    again = PromptSet.load(tmp_path / "set" / "prompts.jsonl")
    assert [p.to_dict() for p in again] == [p.to_dict() for p in ps]
    assert again.images(again.prompts[1])[0].size == (32, 32)
    export_meta(again, tmp_path / "meta.jsonl")
    meta = [json.loads(line) for line in (tmp_path / "meta.jsonl").read_text().splitlines()]
    assert meta[1]["prompt"] == "<img>" and meta[1]["task_type"] == "describe"
    back = import_meta(tmp_path / "meta.jsonl")
    assert back.images(back.prompts[1])[0].tobytes() == again.images(again.prompts[1])[0].tobytes()
    (tmp_path / "meta2.jsonl").write_text(json.dumps(
        {"id": "g", "prompt": "Look <img> and <img>", "task_type": "t", "image_urls": ["https://x/a.jpg"]}))
    with pytest.raises(ValueError, match="2 <img> markers but 1 image_urls"):
        import_meta(tmp_path / "meta2.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "parts": [{"type": "video"}]}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        PromptSet.load(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="duplicate"):
        PromptSet([Prompt("a", [{"type": "text", "text": "x"}])] * 2)


def test_augmented_baseline_replaces_captions_with_images_from_a_stub_server(tmp_path):
    seen: list = []
    prompts = PromptSet([Prompt("p0", [{"type": "text", "text": "please draw two shapes"}]),
                         Prompt("p1", [{"type": "text", "text": "just talk"}], output="text"),
                         Prompt("p2", [{"type": "text", "text": "fail now"}])])
    with LiveServer(stub_app(seen)) as server, ResultStore(tmp_path / "r.sqlite") as store:
        text = EndpointAnswerer(server.url + "/v1", "gpt-stub", temperature=0.0, concurrency=2)
        aug = AugmentedAnswerer(text, server.url + "/v1", "dalle-stub")
        counts = run_generation(store, prompts, aug, "augmented", seed=5, log=None)
        assert counts == {"answered": 3, "kept": 0, "errors": 1}
        a0 = store.answer("augmented", "p0")
        assert [p["type"] for p in a0.parts] == ["text", "image", "text", "image", "text"]
        assert a0.text == "Here you go:  and then  done."
        assert [p["caption"] for p in a0.parts if p["type"] == "image"] == ["a red circle", "a blue square"]
        assert store.image(a0.image_shas[0]).getpixel((3, 3)) == (255, 0, 0)
        assert store.image(a0.image_shas[1]).getpixel((3, 3)) == (0, 0, 255)
        assert a0.seed == 5 and store.answer("augmented", "p1").text == "Just text."
        assert store.answer("augmented", "p2").finish == "error"
        chats = [body for kind, body in seen if kind == "chat"]
        assert all(body["messages"][-1]["content"][-1]["text"] == CAPTION_SUFFIX for body in chats)
        assert {body["seed"] for body in chats} == {5, 6, 7} and chats[0]["temperature"] == 0.0
        assert sorted(b["prompt"] for k, b in seen if k == "image") == ["a blue square", "a red circle"]
        # resume: nothing new is asked for, except the error when retried
        n = len(seen)
        assert run_generation(store, prompts, aug, "augmented", seed=5, log=None)["kept"] == 3
        assert len(seen) == n
        assert run_generation(store, prompts, aug, "augmented", seed=5, retry_errors=True,
                              log=None)["answered"] == 1
        with pytest.raises(ValueError, match="another settings"):
            run_generation(store, prompts, aug, "augmented", seed=6, log=None)


def test_local_model_and_its_server_give_the_same_answers(tmp_path):
    from chameleon_lm.checkpoints import save_model
    from chameleon_lm.serve.app import ServeConfig, create_app

    model, codec = tiny_bundle()
    save_model(tmp_path / "model", model, codec.text, codec.image)
    image = Image.new("RGB", (32, 32), (0, 200, 0))
    image.save(tmp_path / "green.png")
    rows = [{"id": "t", "output": "text", "parts": [{"type": "text", "text": "a red circle"}]},
            {"id": "i", "output": "image", "parts": [{"type": "text", "text": "a green square"}]},
            {"id": "m", "output": "mixed", "category": "story",
             "parts": [{"type": "image", "path": "green.png"}, {"type": "text", "text": "Describe"}]}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = tmp_path / "r.sqlite"
    common = ["--prompts", str(tmp_path / "p.jsonl"), "--store", str(store), "--seed", "3",
              "--max-new-tokens", "12", "--temperature", "0.7", "--top-p", "0.9"]
    assert main(["eval", "generate", "--run", "local", "--model", str(tmp_path / "model"), *common]) == 0
    with ResultStore(store) as s:
        local = {a.prompt: a for a in s.answers("local")}
        assert set(local) == {"t", "i", "m"} and local["i"].modality == "image"
        assert len(local["i"].image_shas) == 1 and s.image(local["i"].image_shas[0]).size == (32, 32)
        assert local["t"].image_shas == [] and [a.seed for a in local.values()] == [3, 4, 5]
        run = next(r for r in s.runs() if r.name == "local")
        assert run.model_hash.startswith("sha256:") and run.versions["torch"] == torch.__version__
    app = create_app(model, codec, ServeConfig(model_name="tiny", engine_process=False,
                                               max_new_tokens=64, default_max_tokens=12))
    with LiveServer(app) as server:
        assert main(["eval", "generate", "--run", "served", "--endpoint", server.url + "/v1",
                     "--endpoint-model", "tiny", "--chameleon-modes", *common]) == 0
    with ResultStore(store) as s:
        served = {a.prompt: a for a in s.answers("served")}
        assert served["t"].text == local["t"].text  # same seed, same model, same prompt ids
        assert served["i"].image_shas == local["i"].image_shas  # equal PNGs, equal hashes
        assert len(s.prompts()) == 3
    assert main(["eval", "generate", "--run", "x", *common]) == 2  # no system given
