"""Mixed-modal documents and their token sequences.

A :class:`Document` is an ordered list of text and image parts. :class:`DocumentCodec` turns it into one
id sequence, ``<s> text … <racm3:break> code×N <eoss> text …``, with the modality of every token, and
parses id sequences (e.g. model output) back into parts. The chat/SFT layout is
``<s> prompt <reserved08706> answer </s>`` with the loss on the answer (and ``</s>``) only; a multi-turn
conversation repeats it without the ``<s>``: ``<s> u1 <reserved08706> a1 </s> u2 <reserved08706> a2 </s>``.

Malformed sequences never decode silently: ``on_error="raise"`` (default) raises ``DecodeError`` naming
the position; ``on_error="repair"`` applies the repair policy below and lists every repair it made in
``Document.repairs``:

- an image block with fewer than N codes (cut short, or closed early by ``<eoss>`` or by a non-image
  token) is padded with its first code, as Meta's streaming previews do; an empty one is dropped;
- codes beyond N in a block are dropped, and the block is closed;
- image codes outside a block, stray ``<eoss>``, and special tokens other than the layout's are dropped;
- tokens after ``</s>`` are dropped.

Ids outside the vocabulary are always an error: they mean the ids do not belong to this tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from PIL import Image

from chameleon_lm.tokenizers.text import TextTokenizer
from chameleon_lm.tokenizers.vocab import IMAGE, SPECIAL, TEXT


class DecodeError(ValueError):
    """An id sequence that does not follow the Chameleon layout."""


class ImageCodec(Protocol):
    """What documents need from an image tokenizer (see ``chameleon_lm.tokenizers.image``)."""

    num_tokens: int
    codebook_size: int

    def encode(self, images: list, mode: str | None = None) -> torch.Tensor: ...

    def decode(self, codes: torch.Tensor) -> list[Image.Image]: ...


@dataclass
class TextPart:
    text: str


@dataclass
class ImagePart:
    """An image, as pixels (``image``), as VQ codes (``codes``, ``[N]`` long), or both."""

    image: Image.Image | None = None
    codes: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.image is None and self.codes is None:
            raise ValueError("an ImagePart needs an image or its codes")
        if self.codes is not None:
            self.codes = torch.as_tensor(self.codes, dtype=torch.long).flatten()


Part = TextPart | ImagePart


@dataclass
class Document:
    parts: list[Part] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)
    """What ``decode(..., on_error="repair")`` changed to make the sequence valid (empty otherwise)."""

    @classmethod
    def of(cls, *items: str | Image.Image | torch.Tensor | Part) -> Document:
        """``Document.of("a red circle", img, "now blue", codes)``: strings, PIL images, code tensors."""
        parts: list[Part] = []
        for item in items:
            if isinstance(item, (TextPart, ImagePart)):
                parts.append(item)
            elif isinstance(item, str):
                parts.append(TextPart(item))
            elif isinstance(item, Image.Image):
                parts.append(ImagePart(image=item))
            elif isinstance(item, torch.Tensor):
                parts.append(ImagePart(codes=item))
            else:
                raise TypeError(f"cannot make a document part from {type(item).__name__}")
        return cls(parts)

    @property
    def text(self) -> str:
        """All text parts joined (images left out)."""
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))

    @property
    def images(self) -> list[ImagePart]:
        return [p for p in self.parts if isinstance(p, ImagePart)]

    def normalized(self) -> Document:
        """Empty text parts dropped and adjacent text parts merged (what a round trip can recover)."""
        parts: list[Part] = []
        for p in self.parts:
            if isinstance(p, TextPart):
                if not p.text:
                    continue
                if parts and isinstance(parts[-1], TextPart):
                    parts[-1] = TextPart(parts[-1].text + p.text)
                    continue
            parts.append(p)
        return Document(parts, list(self.repairs))


@dataclass
class EncodedDocument:
    ids: torch.Tensor
    """``[T]`` long token ids."""
    modality: torch.Tensor
    """``[T]`` int8: TEXT, IMAGE or SPECIAL (``chameleon_lm.tokenizers.vocab``)."""
    loss_mask: torch.Tensor
    """``[T]`` bool: token t is a training target (predicted from the tokens before it)."""

    def __len__(self) -> int:
        return self.ids.numel()


ROLES = ("system", "user", "assistant")


def _merge_system(turns: list[tuple[str, Document]]) -> list[tuple[str, Document]]:
    """The turns with leading system turns prepended to the first user turn; the order checked."""
    out: list[tuple[str, Document]] = []
    system: list = []
    for i, (role, doc) in enumerate(turns):
        if role not in ROLES:
            raise ValueError(f"turn {i}: unknown role {role!r}; known: {', '.join(ROLES)}")
        if role == "system":
            if out:
                raise ValueError(f"turn {i}: a system turn must come before the first user turn")
            system += [*doc.parts, TextPart("\n\n")]
            continue
        expected = "user" if not out or out[-1][0] == "assistant" else "assistant"
        if role != expected:
            raise ValueError(f"turn {i} is {role}, expected {expected}: user and assistant turns "
                             "alternate, starting with a user turn")
        if system:
            doc, system = Document(system + doc.parts), []
        out.append((role, doc))
    if not out:
        raise ValueError("the conversation has no user turn")
    return out


class DocumentCodec:
    """Encode documents to ids and decode ids to documents.

    Args:
        text_tokenizer: the BPE tokenizer (its vocabulary defines every id).
        image_tokenizer: turns images into codes and back; optional when images are given as codes and
            decoding to pixels is not needed.
        image_seq_len: codes per image when there is no image tokenizer (1024 officially).
    """

    def __init__(
        self,
        text_tokenizer: TextTokenizer,
        image_tokenizer: ImageCodec | None = None,
        image_seq_len: int | None = None,
    ):
        self.text = text_tokenizer
        self.image = image_tokenizer
        self.vocab = text_tokenizer.vocab
        if image_tokenizer is not None:
            if image_tokenizer.codebook_size != self.vocab.codebook_size:
                raise ValueError(
                    f"the image tokenizer has {image_tokenizer.codebook_size} codes but the text "
                    f"tokenizer reserves {self.vocab.codebook_size} image tokens"
                )
            if image_seq_len is not None and image_seq_len != image_tokenizer.num_tokens:
                raise ValueError(f"image_seq_len {image_seq_len} != the image tokenizer's "
                                 f"{image_tokenizer.num_tokens} codes per image")
            image_seq_len = image_tokenizer.num_tokens
        self.image_seq_len = image_seq_len if image_seq_len is not None else 1024

    # ------------------------------------------------------------------ encoding

    def encode(
        self, doc: Document, *, bos: bool = True, eos: bool = False, image_mode: str | None = None
    ) -> EncodedDocument:
        """``<s>`` (if ``bos``) + the parts + ``</s>`` (if ``eos``); every token is a target."""
        ids, mod = self._encode_parts(doc, image_mode)
        if bos:
            ids, mod = [self.vocab.bos_id] + ids, [SPECIAL] + mod
        if eos:
            ids, mod = ids + [self.vocab.eos_id], mod + [SPECIAL]
        return self._pack(ids, mod, [True] * len(ids))

    def encode_chat(
        self, prompt: Document, answer: Document, *, prompt_image_mode: str | None = "pad"
    ) -> EncodedDocument:
        """``<s> prompt <reserved08706> answer </s>``: a one-turn :meth:`encode_conversation`."""
        return self.encode_conversation([("user", prompt), ("assistant", answer)],
                                        prompt_image_mode=prompt_image_mode)

    def encode_conversation(
        self, turns: list[tuple[str, Document]], *, prompt_image_mode: str | None = "pad"
    ) -> EncodedDocument:
        """``<s> u1 <reserved08706> a1 </s> u2 <reserved08706> a2 </s> …``; the loss covers the answers.

        Targets are every assistant token and the ``</s>`` that ends its turn (where generation stops);
        ``<s>``, user turns and ``<reserved08706>`` are context only. ``system`` turns, allowed before
        the first user turn only, are prepended to it (a blank line between): the released models have
        no system-prompt template. User and assistant turns then alternate, starting with a user turn;
        a last user turn (ending ``<reserved08706>``) is the prompt for generating the next answer.

        Prompt images are padded to a square (the paper's SFT recipe keeps whole input images);
        answer images use the image tokenizer's own mode (centre crop by default).
        """
        v = self.vocab
        if v.eot_id is None:
            raise ValueError("the tokenizer has no end-of-turn token <reserved08706>")
        merged = _merge_system(turns)
        # one image-tokenizer call per mode for the whole conversation
        prompts = self._image_codes(Document([p for r, d in merged if r == "user" for p in d.parts]),
                                    prompt_image_mode)
        answers = self._image_codes(Document([p for r, d in merged if r == "assistant" for p in d.parts]),
                                    None)
        ids, mod, loss = [v.bos_id], [SPECIAL], [False]
        for role, doc in merged:
            t_ids, t_mod = self._encode_parts(doc, None, prompts if role == "user" else answers)
            ids += t_ids + [v.eot_id if role == "user" else v.eos_id]
            mod += t_mod + [SPECIAL]
            loss += [role == "assistant"] * (len(t_ids) + 1)
        return self._pack(ids, mod, loss)

    def image_block(self, codes: torch.Tensor) -> list[int]:
        """``<racm3:break>`` + the code ids + ``<eoss>``."""
        codes = torch.as_tensor(codes).flatten()
        if codes.numel() != self.image_seq_len:
            raise ValueError(f"an image must have {self.image_seq_len} codes, got {codes.numel()}")
        return [self.vocab.boi_id] + self.vocab.codes_to_ids(codes).tolist() + [self.vocab.eoi_id]

    def _encode_parts(self, doc: Document, image_mode: str | None, codes: list[torch.Tensor] | None = None
                      ) -> tuple[list[int], list[int]]:
        """Ids and modalities of the parts; ``codes``, when given, are the images' codes (consumed)."""
        codes = self._image_codes(doc, image_mode) if codes is None else codes
        ids: list[int] = []
        mod: list[int] = []
        for part in doc.parts:
            if isinstance(part, TextPart):
                t = self.text.encode(part.text)
                bad = [i for i in t if self.vocab.classes[i] != TEXT]
                if bad:
                    raise ValueError(
                        f"text {part.text[:60]!r} encodes to special/image token(s) "
                        f"{[self.text.id_to_token(i) for i in bad[:5]]}; put images in ImageParts"
                    )
                ids += t
                mod += [TEXT] * len(t)
            else:
                block = self.image_block(codes.pop(0))
                ids += block
                mod += [SPECIAL] + [IMAGE] * (len(block) - 2) + [SPECIAL]
        return ids, mod

    def _image_codes(self, doc: Document, image_mode: str | None) -> list[torch.Tensor]:
        """Codes of every image part, in order; pixel images are tokenized in one batch."""
        to_encode = [p.image for p in doc.images if p.codes is None]
        encoded: list[torch.Tensor] = []
        if to_encode:
            if self.image is None:
                raise ValueError("the document has pixel images but the codec has no image tokenizer")
            encoded = list(self.image.encode(to_encode, mode=image_mode))
        return [p.codes if p.codes is not None else encoded.pop(0) for p in doc.images]

    @staticmethod
    def _pack(ids: list[int], mod: list[int], loss: list[bool]) -> EncodedDocument:
        return EncodedDocument(
            torch.tensor(ids, dtype=torch.long),
            torch.tensor(mod, dtype=torch.int8),
            torch.tensor(loss, dtype=torch.bool),
        )

    # ------------------------------------------------------------------ decoding

    def decode(
        self,
        ids: torch.Tensor | list[int],
        *,
        on_error: Literal["raise", "repair"] = "raise",
        decode_images: bool = True,
    ) -> Document:
        """Parse an id sequence into parts (see the module docstring for the error policy).

        A leading ``<s>`` is skipped and ``</s>`` ends the document. Image parts carry their codes, and
        their pixels too when ``decode_images`` and the codec has an image tokenizer.
        """
        if on_error not in ("raise", "repair"):
            raise ValueError(f"on_error must be 'raise' or 'repair', got {on_error!r}")
        ids_t = torch.as_tensor(ids, dtype=torch.long).flatten()
        classes = self.vocab.modality(ids_t).tolist()  # raises on out-of-range ids
        seq = ids_t.tolist()
        v = self.vocab
        doc = Document()

        def problem(pos: int, msg: str) -> None:
            if on_error == "raise":
                raise DecodeError(f"position {pos}: {msg}")
            doc.repairs.append(f"position {pos}: {msg}")

        text_run: list[int] = []

        def flush_text() -> None:
            if text_run:
                doc.parts.append(TextPart(self.text.decode(text_run)))
                text_run.clear()

        i = 1 if seq[:1] == [v.bos_id] else 0
        while i < len(seq):
            tok, cls = seq[i], classes[i]
            if tok == v.eos_id:
                if i + 1 < len(seq):
                    problem(i + 1, f"{len(seq) - i - 1} token(s) after </s> dropped")
                break
            if cls == TEXT:
                text_run.append(tok)
                i += 1
            elif tok == v.boi_id:
                flush_text()
                i = self._decode_image_block(seq, classes, i, doc, problem)
            elif cls == IMAGE:
                problem(i, "image code outside an image block dropped")
                i += 1
            else:
                problem(i, f"unexpected special token {self.text.id_to_token(tok)!r} dropped")
                i += 1
        flush_text()

        if decode_images and self.image is not None and doc.images:
            pixels = self.image.decode(torch.stack([p.codes for p in doc.images]))
            for part, img in zip(doc.images, pixels):
                part.image = img
        return doc

    def _decode_image_block(self, seq, classes, start, doc, problem) -> int:
        """Parse the block opened at ``start``; append its ImagePart; return the next position."""
        v, n = self.vocab, self.image_seq_len
        codes: list[int] = []
        i = start + 1
        while i < len(seq) and classes[i] == IMAGE and len(codes) < n:
            codes.append(seq[i] - v.image_start)
            i += 1
        closed = i < len(seq) and seq[i] == v.eoi_id
        if len(codes) == n and not closed:
            extra = i
            while i < len(seq) and classes[i] == IMAGE:
                i += 1
            if i > extra:
                problem(extra, f"{i - extra} code(s) beyond the {n} of an image dropped")
            closed = i < len(seq) and seq[i] == v.eoi_id
            if not closed:
                problem(i, "image block not closed by <eoss>; closed")
        elif len(codes) < n:
            where = "at <eoss>" if closed else ("at the end" if i == len(seq) else "by a non-image token")
            if not codes:
                problem(start, f"empty image block (ended {where}) dropped")
                return i + 1 if closed else i
            problem(start, f"image block has {len(codes)} of {n} codes (ended {where}); padded with "
                           "its first code")
            codes += [codes[0]] * (n - len(codes))
        doc.parts.append(ImagePart(codes=torch.tensor(codes, dtype=torch.long)))
        return i + 1 if closed else i

    def decode_chat(
        self, ids: torch.Tensor | list[int], *, on_error: Literal["raise", "repair"] = "raise",
        decode_images: bool = True,
    ) -> tuple[Document, Document]:
        """Split a chat sequence at the first end-of-turn token into (prompt, answer)."""
        seq = torch.as_tensor(ids, dtype=torch.long).flatten()
        eot = (seq == self.vocab.eot_id).nonzero()
        if eot.numel() == 0:
            raise DecodeError("no end-of-turn token <reserved08706> in the sequence")
        cut = int(eot[0])
        prompt = self.decode(seq[:cut], on_error=on_error, decode_images=decode_images)
        answer = self.decode(seq[cut + 1 :], on_error=on_error, decode_images=decode_images)
        return prompt, answer
