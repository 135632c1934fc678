"""The OpenAI wire format: request schemas, prompts from messages, and response bodies.

Chat requests follow OpenAI's chat completions API; the generation options it lacks (mode, guidance,
image sampling, previews) are extra body fields, which the ``openai`` client sends with ``extra_body``.
Answers with images (image and interleaved modes) have a list of content parts, images as
``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``; text-mode answers are a
string, as every OpenAI client expects.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from chameleon_lm.data.sources.base import png_bytes
from chameleon_lm.documents import Document, DocumentCodec, ImagePart, TextPart
from chameleon_lm.generation.sampling import GenerationConfig, ImageSampling, TextSampling

PROMPT_FORMATS = ("raw", "chat")
"""``raw``: the messages' parts as one document after ``<s>`` (how base models are prompted);
``chat``: ``<s> user <reserved08706> assistant </s> …`` (models fine-tuned with the ``sft`` recipe)."""


class ApiError(Exception):
    """A client fault: HTTP ``status`` with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# ------------------------------------------------------------------------------------------ schemas

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use


class ImageURL(_Body):
    url: str = Field(max_length=64 * 2**20)


class TextContent(_Body):
    type: Literal["text"]
    text: str


class ImageContent(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


Content = Annotated[TextContent | ImageContent, Field(discriminator="type")]


class Message(_Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[Content] | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class Sampling(_Body):
    """Generation options shared by both endpoints (OpenAI's names where it has them)."""

    model: str | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    temperature: float | None = Field(None, ge=0, le=100, description="0 = greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=2**20)
    cfg_text: float | None = Field(None, ge=-100, le=100, description="image guidance by the prompt")
    cfg_image: float | None = Field(None, ge=-100, le=100,
                                    description="image guidance by the prompt's images")
    image_temperature: float | None = Field(None, ge=0, le=100)
    image_top_p: float | None = Field(None, gt=0, le=1)
    image_top_k: int | None = Field(None, ge=0, le=2**20)
    prompt_format: Literal["raw", "chat"] | None = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stop: str | list[str] | None = None
    mode: Literal["text", "image", "interleaved"] = "text"
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    image_previews: int = Field(0, ge=0, description="a preview every this many image codes; 0 = none")


class CompletionRequest(Sampling):
    """The legacy completions API: a text prompt continued with text (what load generators send)."""

    prompt: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stop: str | list[str] | None = None
    echo: bool = Field(False, description="not supported")
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False


class ImagesRequest(Sampling):
    prompt: str = Field(min_length=1)
    n: int = Field(1, ge=1, le=4)
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    quality: str | None = None
    style: str | None = None


# ------------------------------------------------------------------------------------------ prompts

def generation_config(req: Sampling, *, mode: str, max_new_tokens: int, min_new_tokens: int = 0,
                      repetition_penalty: float | None = None, seed: int | None = None
                      ) -> GenerationConfig:
    """The engine settings of a request: Meta's defaults, overridden by the fields given."""
    text: dict[str, Any] = {}
    image: dict[str, Any] = {}
    if req.temperature is not None:
        if req.temperature == 0:
            text["greedy"] = image["greedy"] = True
        else:
            text["temperature"] = image["temperature"] = req.temperature
    for name, value in (("top_p", req.top_p), ("top_k", req.top_k)):
        if value is not None:
            text[name] = image[name] = value
    if repetition_penalty is not None:
        text["repetition_penalty"] = repetition_penalty
    for name in ("temperature", "top_p", "top_k"):
        value = getattr(req, f"image_{name}")
        if value is not None:
            if name == "temperature" and value == 0:
                image["greedy"] = True
            else:
                image[name] = value
    for name in ("cfg_text", "cfg_image"):
        if getattr(req, name) is not None:
            image[name] = getattr(req, name)
    try:
        return GenerationConfig(mode=mode, text=TextSampling(**text), image=ImageSampling(**image),
                                max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                seed=seed)
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def message_turns(messages: list[Message], images: list[Image.Image]) -> list[tuple[str, Document]]:
    """(role, document) per message; ``images`` are the decoded image parts in order (consumed)."""
    pictures = iter(images)
    turns = []
    for message in messages:
        content = message.content
        if content is None or isinstance(content, str):
            parts: list = [TextPart(content)] if content else []
        else:
            parts = [TextPart(c.text) if isinstance(c, TextContent) else ImagePart(next(pictures))
                     for c in content if not (isinstance(c, TextContent) and not c.text)]
        turns.append((message.role, Document(parts)))
    return turns


def image_urls(messages: list[Message]) -> list[tuple[str, str]]:
    """(where, url) of every image part, in order."""
    return [(f"messages[{i}].content[{j}]", c.image_url.url)
            for i, m in enumerate(messages) if isinstance(m.content, list)
            for j, c in enumerate(m.content) if isinstance(c, ImageContent)]


def prompt_ids(codec: DocumentCodec, turns: list[tuple[str, Document]], prompt_format: str) -> list[int]:
    """The prompt of a conversation whose answer comes next."""
    if not any(doc.parts for _, doc in turns):
        raise ApiError(400, "the messages hold no text and no image", param="messages")
    try:
        if prompt_format == "chat":
            if turns[-1][0] != "user":
                raise ApiError(400, "with prompt_format 'chat' the last message must be the user's",
                               param="messages")
            return codec.encode_conversation(turns).ids.tolist()
        parts = []
        for _, doc in turns:
            if parts and doc.parts and isinstance(parts[-1], TextPart) and isinstance(doc.parts[0], TextPart):
                parts.append(TextPart("\n\n"))
            parts += doc.parts
        return codec.encode(Document(parts), bos=True).ids.tolist()
    except ApiError:
        raise
    except ValueError as e:
        raise ApiError(400, f"the prompt cannot be encoded: {e}", param="messages") from None


# ---------------------------------------------------------------------------------------- responses

def png_data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + png_b64(image)


def png_b64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode()


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def finish_reason(reason: str) -> str:
    """OpenAI's finish reasons: a time limit is a limit too."""
    return "stop" if reason == "stop" else "length"
