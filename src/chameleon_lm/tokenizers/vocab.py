"""The shared vocabulary: which id is which special token, which ids are image codes.

Everything is derived from the token *names*, as Meta's ``VocabInfo`` does, so the official
``text_tokenizer.json``, the Hugging Face ``tokenizer.json`` and our own trained files all work:

- ``<s>`` BOS, ``<pad>``, ``</s>`` EOS, ``<unk>``;
- image code ``c`` is the token named ``IMGIMG`` + the decimal digits of ``c`` written as letters
  (A=0 … J=9) + ``Z``; the ids must be contiguous (``id = image_start + c``), which we check;
- ``<eoss>`` ends an image block, ``<racm3:break>`` begins one, ``<reserved08706>`` ends a turn;
- "special" tokens are all names that start with ``<`` (except ``<`` itself); "text" tokens are the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

BOS, PAD, EOS, UNK = "<s>", "<pad>", "</s>", "<unk>"
EOI, BOI = "<eoss>", "<racm3:break>"
EOT = "<reserved08706>"
HF_IMAGE_PLACEHOLDER = "<image>"
IMAGE_PREFIX = "IMGIMG"

TEXT, IMAGE, SPECIAL = 0, 1, 2
"""Modality classes of ids, as returned by :meth:`Vocab.modality`."""


def image_token_name(code: int) -> str:
    """``IMGIMG`` + digits of ``code`` as letters (A=0 … J=9) + ``Z``; e.g. 53 → ``IMGIMGFDZ``."""
    return IMAGE_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def image_code_from_name(name: str) -> int | None:
    """The code of an image token name, or None if ``name`` is not one."""
    if not (name.startswith(IMAGE_PREFIX) and name.endswith("Z")) or len(name) <= len(IMAGE_PREFIX) + 1:
        return None
    letters = name[len(IMAGE_PREFIX) : -1]
    if not all("A" <= ch <= "J" for ch in letters):
        return None
    return int("".join(str(ord(ch) - ord("A")) for ch in letters))


def is_special_name(name: str) -> bool:
    return name.startswith("<") and name != "<"


@dataclass(frozen=True)
class Vocab:
    """Roles and modality classes of the ids of one tokenizer."""

    size: int
    bos_id: int
    pad_id: int
    eos_id: int
    unk_id: int | None
    boi_id: int
    eoi_id: int
    eot_id: int | None
    image_start: int
    codebook_size: int
    classes: torch.Tensor = field(repr=False, compare=False)
    """``[size]`` int8 tensor: TEXT, IMAGE or SPECIAL per id."""

    @classmethod
    def from_names(cls, token_to_id: dict[str, int], size: int | None = None) -> Vocab:
        """Build from a token→id map (e.g. ``tokenizers.Tokenizer.get_vocab()``)."""
        size = size if size is not None else max(token_to_id.values()) + 1
        classes = torch.full((size,), TEXT, dtype=torch.int8)
        image_ids: dict[int, int] = {}
        for name, i in token_to_id.items():
            if not 0 <= i < size:
                raise ValueError(f"token {name!r} has id {i}, outside the vocabulary size {size}")
            code = image_code_from_name(name)
            if code is not None:
                if code in image_ids:
                    raise ValueError(f"two tokens name image code {code} (ids {image_ids[code]}, {i})")
                image_ids[code] = i
                classes[i] = IMAGE
            elif is_special_name(name):
                classes[i] = SPECIAL

        def need(name: str) -> int:
            if name not in token_to_id:
                raise ValueError(f"the tokenizer has no {name!r} token (required by the Chameleon layout)")
            return token_to_id[name]

        if not image_ids:
            raise ValueError("the tokenizer has no image tokens (IMGIMG…Z)")
        k = len(image_ids)
        if sorted(image_ids) != list(range(k)):
            raise ValueError(f"image codes are not 0..{k - 1}: the IMGIMG tokens are incomplete")
        start = image_ids[0]
        if any(image_ids[c] != start + c for c in range(k)):
            raise ValueError("image token ids are not contiguous and increasing with the code")
        return cls(
            size=size, bos_id=need(BOS), pad_id=need(PAD), eos_id=need(EOS),
            unk_id=token_to_id.get(UNK), boi_id=need(BOI), eoi_id=need(EOI),
            eot_id=token_to_id.get(EOT), image_start=start, codebook_size=k, classes=classes,
        )

    # ----- image codes <-> ids

    @property
    def image_end(self) -> int:
        """One past the last image-code id."""
        return self.image_start + self.codebook_size

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"image codes must be in [0, {self.codebook_size}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        return codes.long() + self.image_start

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() and (ids.min() < self.image_start or ids.max() >= self.image_end):
            raise ValueError(f"ids are not image tokens (expected [{self.image_start}, {self.image_end}))")
        return ids.long() - self.image_start

    # ----- modality classes

    def modality(self, ids: torch.Tensor) -> torch.Tensor:
        """TEXT / IMAGE / SPECIAL per id (same shape as ``ids``)."""
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.size):
            raise ValueError(f"token ids must be in [0, {self.size})")
        return self.classes.to(ids.device)[ids]

    def text_mask(self) -> torch.Tensor:
        """``[size]`` bool: plain text tokens (what Meta's text decoder allows, besides ``</s>``)."""
        return self.classes == TEXT

    def image_mask(self) -> torch.Tensor:
        """``[size]`` bool: the image-code tokens."""
        return self.classes == IMAGE
