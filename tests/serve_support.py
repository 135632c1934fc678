"""A real server for tests: a tiny model with a tiny VQGAN, served by uvicorn on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time

import torch


def tiny_bundle(seed: int = 0):
    """(model, codec) with text and image tokenizers (images encode and decode)."""
    from chameleon_lm import VQGAN, Chameleon, ChameleonConfig, DocumentCodec, VQGANConfig, train_text_tokenizer
    from chameleon_lm.tokenizers.image import ImageTokenizer

    torch.manual_seed(seed)
    vq = VQGANConfig.preset("tiny")
    corpus = ["a red circle turns blue and moves to the left", "Describe the picture: a green square"] * 60
    text = train_text_tokenizer(corpus, 600, codebook_size=vq.n_embed)
    codec = DocumentCodec(text, ImageTokenizer(VQGAN(vq).eval()))
    model = Chameleon(ChameleonConfig.preset("tiny", vocab_size=len(text), max_seq_len=512)).eval()
    return model, codec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``create_app`` under uvicorn in a thread; ``url`` is its base URL."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
