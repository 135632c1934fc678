"""Records (JSONL lines, parquet rows) as samples: the kind chosen by field names, records parsed."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from chameleon_lm.data.sources.base import (
    IMAGE_FIELDS, ImageRef, SkipSample, SourceConfig, decode_text, resolve_image,
)

INTERLEAVED_FIELDS = ("texts", "images")


class RecordFormat:
    """How the records of one source are read: the kind and the fields it takes them from.

    Attributes:
        kind: ``pairs``, ``text`` or ``interleaved``.
        image_field: The image field of pairs (``None``: none found, every record lacks an image).
        caption_field: The caption field of pairs.
        used: The fields that become segments, left out of the metadata.
    """

    def __init__(self, config: SourceConfig, names: Iterable[str] | None,
                 is_image: Callable[[str], bool], where: str):
        """Choose the kind and fields from the field names of a sample record.

        Args:
            config: The source's config (``kind``, ``text_field``, ``caption_field``, ``image_field``).
            names: The field names of a record (JSONL) or the columns (parquet); ``None`` when the
                source holds no record at all.
            is_image: Whether the field of that name holds images (bytes, path or URL, struct).
            where: The file the names come from, for messages.

        Raises:
            ValueError: ``kind`` is ``auto`` and the fields fit no kind.
        """
        names = list(names or ())
        if config.image_field != "auto":
            image = config.image_field
        else:
            image = next((n for n in IMAGE_FIELDS if n in names and is_image(n)), None)
        caption = config.caption_field
        if caption not in names and config.text_field in names:
            caption = config.text_field  # e.g. {"image", "text"} caption datasets
        kind = config.kind
        if kind == "auto":
            if all(n in names for n in INTERLEAVED_FIELDS):
                kind = "interleaved"
            elif image is not None and image in names:
                kind = "pairs"
            elif config.text_field in names or not names:
                kind = "text"
            else:
                raise ValueError(
                    f"{where}: cannot tell the kind of data from the fields {names}: expected "
                    f"'texts' and 'images' (interleaved), an image field ({', '.join(IMAGE_FIELDS)}; "
                    f"or set image_field) or the text field {config.text_field!r} (set text_field)")
        self.kind = kind
        self.image_field = image
        self.caption_field = caption
        self.text_field = config.text_field
        self.allow_remote = config.allow_remote
        self.used = {"interleaved": INTERLEAVED_FIELDS, "pairs": (image, caption),
                     "text": (config.text_field,)}[kind]

    def parse(self, record: dict[str, Any], key: str, folder: str) -> list[str | ImageRef]:
        """The segments of one record.

        Args:
            record: The record's fields.
            key: The sample key, for messages.
            folder: The folder relative image paths are relative to.

        Raises:
            SkipSample: The record cannot be used (the reason says why).
        """
        if self.kind == "text":
            if self.text_field not in record:
                raise SkipSample("bad_record", f"{key}: no field {self.text_field!r}")
            text = decode_text(record[self.text_field], f"{key} field {self.text_field!r}")
            if text is None or not text.strip():
                raise SkipSample("empty_text", f"{key}: field {self.text_field!r} is empty")
            return [text]
        if self.kind == "pairs":
            name = self.image_field
            image = None if name is None else resolve_image(
                record.get(name), folder, self.allow_remote, f"{key} field {name!r}")
            if image is None:
                raise SkipSample("no_image", f"{key}: no image (field {name or 'image'!r})")
            caption = decode_text(record.get(self.caption_field),
                                  f"{key} field {self.caption_field!r}")
            return [image, caption] if caption is not None and caption.strip() else [image]
        return self._interleaved(record, key, folder)

    def _interleaved(self, record: dict[str, Any], key: str, folder: str) -> list[str | ImageRef]:
        texts, images = record.get("texts"), record.get("images")
        if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
            raise SkipSample("bad_record", f"{key}: 'texts' and 'images' must be lists of one length")
        segments: list[str | ImageRef] = []
        for position, (text, image) in enumerate(zip(texts, images)):
            if text is not None and image is not None:
                raise SkipSample("bad_record", f"{key}: position {position} holds a text and an image")
            if image is not None:
                segments.append(resolve_image(image, folder, self.allow_remote,
                                              f"{key} image {position}"))
            else:
                text = decode_text(text, f"{key} text {position}")
                if text:
                    segments.append(text)
        if not segments:
            raise SkipSample("empty_document", f"{key}: no text and no image")
        return segments
