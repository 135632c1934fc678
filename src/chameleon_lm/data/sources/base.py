"""What every source yields: samples of text and not-yet-decoded images, or the reason one was skipped.

A source splits its dataset into *units* (a tar shard, a folder, a parquet row group, a run of JSONL
lines): stable names that are the unit of parallel work and of resumable tokenization. Reading a unit
never raises on bad data; a sample that cannot be used becomes a :class:`Skipped` with a reason.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from chameleon_lm.data.sources import paths
from chameleon_lm.utils.config import Config

if TYPE_CHECKING:
    from PIL import Image

FORMATS = ("webdataset", "files", "parquet", "jsonl")
KINDS = ("pairs", "text", "interleaved", "messages")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
"""Image file extensions, in the order a sample with several of them picks its image."""
IMAGE_FIELDS = ("image", "jpg", "png", "webp", "image_bytes", "bytes")
"""Columns/fields tried, in order, for the image of a pair when ``image_field`` is ``auto``."""
MAX_META_CHARS = 1024
"""Longer string values are left out of :attr:`Sample.meta` (it travels with millions of samples)."""
MAX_REMOTE_BYTES = 64 << 20
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclass(frozen=True)
class ImageRef:
    """An image not decoded yet: exactly one of encoded bytes, a local path or a remote URL."""

    data: bytes | None = None
    """Encoded image bytes."""
    path: str | None = None
    """Local file path (absolute or relative to the working directory)."""
    url: str | None = None
    """Remote http(s) URL; only produced by sources with ``allow_remote=True``."""

    def __repr__(self) -> str:  # never print megabytes of image bytes
        shown = [f"data=<{len(self.data)} bytes>"] if self.data is not None else []
        shown += [f"{name}={getattr(self, name)!r}" for name in ("path", "url")
                  if getattr(self, name) is not None]
        return f"ImageRef({', '.join(shown)})"


@dataclass
class Sample:
    """One document of a source."""

    key: str
    """Unique within the source and stable across runs: ``"<unit>/<key within the unit>"``."""
    segments: list[str | ImageRef]
    """Texts and images in document order: ``[ImageRef, caption]`` for pairs (``[ImageRef]`` when the
    image has no caption), ``[text]`` for text, as stored for interleaved documents."""
    meta: dict[str, Any]
    """Scalar metadata (str, int, float, bool, None) of the sample: sidecar JSON fields, other columns
    or other JSONL fields; nested and long values are left out."""
    roles: list[str] | None = None
    """``messages`` only: the role (``system``, ``user``, ``assistant``) of each segment; a turn is a run
    of segments of one role. ``None`` for the other kinds."""


@dataclass
class Skipped:
    """A sample (or the rest of a unit) that could not be read, and why."""

    key: str
    """The sample's key, or the unit's name when the rest of the unit is lost."""
    reason: str
    """Short snake_case reason: ``undecodable_text``, ``empty_text``, ``bad_record``,
    ``missing_image``, ``remote_image_refused``, ``truncated_shard``, ``no_image``, ..."""
    detail: str
    """Human-readable message."""


@dataclass
class SourceConfig(Config):
    """Where a dataset is and how to read it."""

    path: str
    """A file, folder, glob, brace pattern (``'d/{000000..000009}.tar'``) or fsspec URL (``s3://``,
    ``gs://``, ``file://``, ``memory://``)."""
    format: str = "auto"
    """``webdataset``, ``files``, ``parquet`` or ``jsonl``; ``auto``: by extension, or for a folder by
    what it holds (tar shards, else image files, else parquet or JSONL files)."""
    kind: str = "auto"
    """``pairs``, ``text``, ``interleaved`` or ``messages`` (conversations, JSONL and parquet only);
    ``auto``: pairs for tar shards and files folders; for JSONL and parquet interleaved with
    ``texts``/``images`` fields, else messages with a ``messages`` list, else pairs with an image
    field, else text."""
    text_field: str = "text"
    """The text field of text JSONL/parquet; also a pair's caption where ``caption_field`` is absent."""
    caption_field: str = "caption"
    """The caption column of pair parquet/JSONL; in tar shards and files folders the sidecar JSON field
    read when a sample has no ``.txt``."""
    image_field: str = "auto"
    """The image column of pair parquet/JSONL: bytes, a path/URL, or a ``{"bytes", "path"}`` struct (the
    Hugging Face ``Image`` feature); ``auto``: the first of ``IMAGE_FIELDS`` present."""
    allow_remote: bool = False
    """Yield http(s) image URLs as :class:`ImageRef` ``url``; otherwise such a sample is skipped with
    ``remote_image_refused``."""
    rows_per_unit: int = 10000
    """JSONL lines per unit (parquet: one unit per row group)."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"SourceConfig.path must be a non-empty string, got {self.path!r}")
        if self.format not in FORMATS + ("auto",):
            raise ValueError(f"{self.path}: unknown format {self.format!r}; known: "
                             f"{', '.join(FORMATS)} or auto")
        if self.kind not in KINDS + ("auto",):
            raise ValueError(f"{self.path}: unknown kind {self.kind!r}; known: "
                             f"{', '.join(KINDS)} or auto")
        if self.rows_per_unit < 1:
            raise ValueError(f"{self.path}: rows_per_unit must be >= 1, got {self.rows_per_unit}")


class Source(Protocol):
    """A dataset as named units of samples."""

    config: SourceConfig
    kind: str
    """The resolved kind: ``pairs``, ``text``, ``interleaved`` or ``messages``."""

    def units(self) -> list[str]:
        """Unit names covering the whole dataset, ordered by file and by position in the file."""
        ...

    def read(self, unit: str) -> Iterator[Sample | Skipped]:
        """The samples of one unit, in order; bad data comes out as :class:`Skipped`."""
        ...

    def __iter__(self) -> Iterator[Sample | Skipped]:
        """The samples of every unit, in unit order."""
        ...


class SkipSample(Exception):
    """Raised while parsing one record; the reader turns it into a :class:`Skipped`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class UnitSource:
    """The shared part of the sources: the cached unit list, unit checks and iteration."""

    def __init__(self, config: SourceConfig, kind: str):
        self.config = config
        self.kind = kind
        self._units: list[str] | None = None
        self._unit_set: set[str] = set()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config.path!r}, kind={self.kind!r})"

    def units(self) -> list[str]:
        if self._units is None:
            self._units = self._list_units()
            self._unit_set = set(self._units)
        return list(self._units)

    def read(self, unit: str) -> Iterator[Sample | Skipped]:
        self._check_unit(unit)
        return self._read(unit)

    def __iter__(self) -> Iterator[Sample | Skipped]:
        for unit in self.units():
            yield from self._read(unit)

    def _check_unit(self, unit: str) -> None:
        if self._units is None:
            self.units()
        if unit not in self._unit_set:
            raise KeyError(f"{unit!r} is not a unit of {self.config.path}")

    def _list_units(self) -> list[str]:
        """The units in order (files sorted, then position in the file); computed once."""
        raise NotImplementedError

    def _read(self, unit: str) -> Iterator[Sample | Skipped]:
        raise NotImplementedError


def scalar_meta(record: dict[str, Any], exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The scalar fields of ``record`` (strings up to ``MAX_META_CHARS``), less ``exclude``."""
    meta = {}
    for name, value in record.items():
        if name in exclude or not isinstance(name, str):
            continue
        if value is None or isinstance(value, (bool, int, float)):
            meta[name] = value
        elif isinstance(value, str) and len(value) <= MAX_META_CHARS:
            meta[name] = value
    return meta


def decode_text(value: Any, what: str) -> str | None:
    """A text field as ``str`` (bytes decoded as UTF-8); ``None`` stays ``None``.

    Raises:
        SkipSample: ``undecodable_text`` for invalid UTF-8 (or lone surrogates from JSON escapes),
            ``bad_record`` for a value that is not text.
    """
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise SkipSample("undecodable_text", f"{what} is not valid UTF-8 ({e})") from None
    if not isinstance(value, str):
        raise SkipSample("bad_record", f"{what} is a {type(value).__name__}, not text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SkipSample("undecodable_text", f"{what} holds an unpaired surrogate ({e})") from None
    return value


def resolve_image(value: Any, folder: str, allow_remote: bool, what: str) -> ImageRef | None:
    """An image value of a record (bytes, path, URL or ``{"bytes", "path"}``) as an :class:`ImageRef`.

    Args:
        value: The stored value; ``None`` gives ``None``.
        folder: The folder relative paths are relative to (the record file's folder; local or URL).
        allow_remote: Accept http(s) URLs.
        what: The value's name in messages.

    Raises:
        SkipSample: ``remote_image_refused``, ``missing_image`` or ``bad_record``.
    """
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return ImageRef(data=bytes(value))
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return resolve_image(value["bytes"], folder, allow_remote, what)
        if value.get("path") is not None:
            return resolve_image(value["path"], folder, allow_remote, what)
        raise SkipSample("bad_record", f"{what} has neither bytes nor a path")
    if not isinstance(value, str) or not value:
        raise SkipSample("bad_record", f"{what} is {value!r}, not image bytes, a path or a URL")
    if value.startswith(("http://", "https://")):
        if not allow_remote:
            raise SkipSample("remote_image_refused",
                             f"{what} is a remote URL {value} (set allow_remote to fetch it)")
        return ImageRef(url=value)
    if not paths.is_url(value) and (os.path.isabs(value) or not paths.is_url(folder)):
        local = value if os.path.isabs(value) else os.path.join(folder, value)
        if not os.path.isfile(local):
            raise SkipSample("missing_image", f"{what}: no such file {local}")
        return ImageRef(path=local)
    # an fsspec URL, or a path relative to a remote folder: there is no local path to hand on
    url = value if paths.is_url(value) else paths.join(folder, value)
    try:
        with paths.open_binary(url) as f:
            return ImageRef(data=f.read())
    except FileNotFoundError:
        raise SkipSample("missing_image", f"{what}: no such file {url}") from None


MESSAGES_FIELD = "messages"
MESSAGE_ROLES = ("system", "user", "assistant")


def is_messages(config: SourceConfig, names: list[str], is_list: Callable[[str], bool]) -> bool:
    """Whether records with these fields are conversations: ``kind`` says so, or is ``auto`` and the
    records have a ``messages`` list (and not the interleaved ``texts``/``images`` fields)."""
    if config.kind != "auto":
        return config.kind == "messages"
    return MESSAGES_FIELD in names and is_list(MESSAGES_FIELD) and not {"texts", "images"} <= set(names)


class MessagesFormat:
    """Conversation records (the ``messages`` kind): an OpenAI-style ``messages`` list as segments + roles.

    A message is ``{"role": "system" | "user" | "assistant", "content": ...}``, its content a string or a
    list of parts: ``{"type": "text", "text"}``, ``{"type": "image_url", "image_url": {"url"}}`` (a
    ``data:`` URL, a path relative to the file's folder, or an http(s) URL, refused unless
    ``allow_remote``) or ``{"type": "image", "image" | "bytes" | "path" | "url": ...}`` (bytes, a path, a
    URL or the Hugging Face ``{"bytes", "path"}`` struct). Consecutive messages of one role make one
    turn, a blank line between them, since the token layout has no boundary there; system messages come
    before the first user message. A string ``category`` field (the SFT data category) stays in the
    metadata like any scalar field, so mixtures can weight by it.
    """

    kind = "messages"
    used = (MESSAGES_FIELD,)

    def __init__(self, config: SourceConfig):
        self.allow_remote = config.allow_remote

    def parse(self, record: dict[str, Any], key: str, folder: str) -> tuple[list[str | ImageRef], list[str]]:
        """The segments of one conversation and the role of each.

        Raises:
            SkipSample: ``bad_record``, ``unknown_role``, ``assistant_first``, ``misplaced_system``,
                ``empty_turn``, ``no_assistant``, ``bad_image_data`` (a ``data:`` URL that does not
                decode), ``undecodable_text``, ``missing_image`` or ``remote_image_refused``.
        """
        messages = record.get(MESSAGES_FIELD)
        if not isinstance(messages, list):
            raise SkipSample("bad_record", f"{key}: {MESSAGES_FIELD!r} is not a list")
        category = record.get("category")
        if category is not None and not isinstance(category, str):
            raise SkipSample("bad_record", f"{key}: 'category' is a {type(category).__name__}, not a string")
        segments: list[str | ImageRef] = []
        roles: list[str] = []
        for i, message in enumerate(messages):
            what = f"{key} message {i}"
            if not isinstance(message, dict):
                raise SkipSample("bad_record", f"{what} is not an object")
            role = message.get("role")
            if role not in MESSAGE_ROLES:
                raise SkipSample("unknown_role", f"{what}: role {role!r} is not system, user or assistant")
            if role == "assistant" and "user" not in roles:
                raise SkipSample("assistant_first", f"{what}: an assistant message before any user message")
            if role == "system" and "user" in roles:
                raise SkipSample("misplaced_system", f"{what}: a system message after a user message")
            content = self._content(message.get("content"), what, folder)
            if not any(not isinstance(c, str) or c.strip() for c in content):
                raise SkipSample("empty_turn", f"{what}: no text and no image")
            if roles and roles[-1] == role:
                segments.append("\n\n")
                roles.append(role)
            segments += content
            roles += [role] * len(content)
        if "assistant" not in roles:
            raise SkipSample("no_assistant", f"{key}: no assistant message to train on")
        return segments, roles

    def _content(self, value: Any, what: str, folder: str) -> list[str | ImageRef]:
        if value is None or isinstance(value, (str, bytes)):
            text = decode_text(value, what)
            return [text] if text else []
        if not isinstance(value, list):
            raise SkipSample("bad_record", f"{what}: content is a {type(value).__name__}, not text or a list")
        out: list[str | ImageRef] = []
        for j, part in enumerate(value):
            where = f"{what} part {j}"
            part = {"type": "text", "text": part} if isinstance(part, str) else part
            if not isinstance(part, dict):
                raise SkipSample("bad_record", f"{where} is not an object")
            if part.get("type") == "text":
                text = decode_text(part.get("text"), where)
                out += [text] if text else []
            elif part.get("type") == "image_url":
                url = part.get("image_url")
                out.append(self._image(url.get("url") if isinstance(url, dict) else url, where, folder))
            elif part.get("type") == "image":
                found = (part[k] for k in ("image", "bytes", "path", "url") if part.get(k) is not None)
                out.append(self._image(next(found, None), where, folder))
            else:
                raise SkipSample("bad_record", f"{where}: unknown content type {part.get('type')!r}")
        return out

    def _image(self, value: Any, what: str, folder: str) -> ImageRef:
        if value is None:
            raise SkipSample("bad_record", f"{what}: an image part without an image")
        if isinstance(value, str) and value.startswith("data:"):
            return ImageRef(data=data_url_bytes(value, what))
        return resolve_image(value, folder, self.allow_remote, what)


def data_url_bytes(url: str, what: str) -> bytes:
    """The bytes of an image ``data:`` URL (base64 or percent-encoded).

    Raises:
        SkipSample: ``bad_image_data``: not an image data URL, bad base64, or no bytes.
    """
    header, comma, payload = url[len("data:"):].partition(",")
    media = header.split(";")[0]
    if not comma or (media and not media.startswith("image/")):
        raise SkipSample("bad_image_data", f"{what}: not an image data URL ({url[:40]}...)")
    try:
        if header.endswith(";base64"):
            data = base64.b64decode("".join(payload.split()), validate=True)
        else:
            data = urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as e:
        raise SkipSample("bad_image_data", f"{what}: the data URL does not decode ({e})") from None
    if not data:
        raise SkipSample("bad_image_data", f"{what}: the data URL holds no bytes")
    return data


def load_image(ref: ImageRef, *, allow_remote: bool = False) -> Image.Image:
    """Decode an :class:`ImageRef` with ``tokenizers.images.open_image`` (bomb-safe, every mode).

    Args:
        ref: The image.
        allow_remote: Fetch ``ref.url`` over http(s); refused otherwise.

    Returns:
        The PIL image, in a mode ``whiten_transparency`` handles.

    Raises:
        ImageError: The image is undecodable, too large, missing, remote and refused, or unreachable;
            ``__cause__`` is the underlying error (e.g. ``DecompressionBombError``, ``FileNotFoundError``).
    """
    from chameleon_lm.tokenizers.images import ImageError, open_image

    if ref.data is not None:
        try:
            return open_image(ref.data)
        except ImageError as e:
            # PIL names in-memory files by a repr with a memory address: keep messages reproducible
            message = _ADDRESS.sub("", str(e))
            if message == str(e):
                raise
            raise ImageError(message) from e.__cause__
    if ref.path is not None:
        try:
            return open_image(ref.path)
        except FileNotFoundError as e:
            raise ImageError(f"{ref.path}: no such image file") from e
    if ref.url is not None:
        if not allow_remote:
            raise ImageError(f"{ref.url}: remote image refused (pass allow_remote=True)")
        if not ref.url.startswith(("http://", "https://")):
            raise ImageError(f"{ref.url}: only http(s) URLs are fetched")
        try:
            with urllib.request.urlopen(ref.url, timeout=30) as response:
                data = response.read(MAX_REMOTE_BYTES + 1)
        except (OSError, ValueError) as e:
            raise ImageError(f"{ref.url}: could not fetch ({e})") from e
        if len(data) > MAX_REMOTE_BYTES:
            raise ImageError(f"{ref.url}: larger than {MAX_REMOTE_BYTES} bytes")
        return open_image(data)
    raise ImageError("ImageRef holds no data, path or url")


def png_bytes(image: Image.Image) -> bytes:
    """PNG encoding with fixed options and no metadata: equal images give equal bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6, optimize=False)
    return buffer.getvalue()


def _samples(source: Source, skipped: Counter[str] | None) -> Iterator[Sample]:
    """The samples of a source, counting the reasons of skipped ones in ``skipped`` when given."""
    for item in source:
        if isinstance(item, Skipped):
            if skipped is not None:
                skipped[item.reason] += 1
            continue
        yield item


def iter_texts(source: Source, skipped: Counter[str] | None = None) -> Iterator[str]:
    """Every non-empty text segment of a source: captions, text documents, interleaved texts.

    Args:
        source: The source.
        skipped: When given, counts the reasons of skipped samples.
    """
    for item in _samples(source, skipped):
        yield from (s for s in item.segments if isinstance(s, str) and s.strip())


def iter_images(source: Source, skipped: Counter[str] | None = None
                ) -> Iterator[tuple[str, ImageRef]]:
    """``(sample key, image)`` for every image segment of a source, in order.

    Args:
        source: The source.
        skipped: When given, counts the reasons of skipped samples.
    """
    for item in _samples(source, skipped):
        yield from ((item.key, s) for s in item.segments if isinstance(s, ImageRef))
