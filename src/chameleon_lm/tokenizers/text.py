"""The text tokenizer: byte-level BPE in a ``tokenizer.json`` laid out like Chameleon's.

Id layout of a tokenizer trained here (the official ``text_tokenizer.json`` has the same head):

====================  =========================================================
id                    token
====================  =========================================================
0, 1, 2, 3            ``<s>``, ``<pad>``, ``</s>``, ``<unk>``
4 … 4+K−1             image codes 0 … K−1 (``IMGIMGAZ``, ``IMGIMGBZ``, …)
4+K, 4+K+1            ``<eoss>`` (end of image), ``<racm3:break>`` (begin of image)
4+K+2 …               R reserved tokens ``<reservedNNNNN>`` (NNNNN = id − 4), end-of-turn among them
then                  the 256 byte symbols and the learned BPE merges
====================  =========================================================

With K = 8192 and R ≥ 514 this is exactly the official layout: end-of-turn ``<reserved08706>`` is id 8710
and ``<reserved08707>`` (HF's ``<image>`` placeholder) is 8711. With a smaller codebook those ids do not
exist, so the first reserved slot is named ``<reserved08706>`` and serves as end-of-turn.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from chameleon_lm.tokenizers.vocab import (
    BOI, BOS, EOI, EOS, EOT, PAD, UNK, Vocab, image_token_name,
)

OFFICIAL_CODEBOOK_SIZE = 8192
_EOT_ID_OFFICIAL = 8710

# The official pre-tokenizer: isolate sentinels, image-token names, whitespace runs, single digits and
# punctuation, then the GPT-2 split, then map bytes to the byte-level alphabet.
_SPLITS = [
    r"<sentinel:[0-9]+>",
    r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
    r"([\t\n]|    |  )",
    r"\p{N}",
    r"[\p{P}!-/:-@\[-`{-~]",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
]


def special_tokens(codebook_size: int, num_reserved: int) -> list[str]:
    """The names of ids ``0 … 4+K+2+R−1`` in order (see the module docstring)."""
    first_reserved = 4 + codebook_size + 2
    reserved = [f"<reserved{i - 4:05d}>" for i in range(first_reserved, first_reserved + num_reserved)]
    if EOT not in reserved:
        if not reserved:
            raise ValueError("num_reserved must be at least 1 (the end-of-turn token is reserved)")
        reserved[0] = EOT
    return [BOS, PAD, EOS, UNK] + [image_token_name(c) for c in range(codebook_size)] + [EOI, BOI] + reserved


def _default_num_reserved(codebook_size: int) -> int:
    # Enough to reach the official <reserved08707> with the official codebook; a few otherwise.
    return 1024 if codebook_size == OFFICIAL_CODEBOOK_SIZE else 16


def _empty_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _SPLITS]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the Chameleon roles of its ids.

    ``encode`` never adds BOS and never turns special-token names that appear in the text into special
    ids (a user writing ``<s>`` or ``IMGIMGBZ`` gets text tokens): specials enter a sequence only through
    :mod:`chameleon_lm.documents`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokenizer.encode_special_tokens = True
        self.vocab = Vocab.from_names(tokenizer.get_vocab(with_added_tokens=True))

    def __len__(self) -> int:
        return self.vocab.size

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def id_to_token(self, i: int) -> str | None:
        return self.tokenizer.id_to_token(i)

    def token_to_id(self, name: str) -> int | None:
        return self.tokenizer.token_to_id(name)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` (``path`` may be a folder or the file name)."""
        path = Path(path)
        if path.suffix != ".json":
            path.mkdir(parents=True, exist_ok=True)
            path = path / "tokenizer.json"
        self.tokenizer.save(str(path))
        return path


def train_text_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    codebook_size: int = OFFICIAL_CODEBOOK_SIZE,
    num_reserved: int | None = None,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> TextTokenizer:
    """Train a byte-level BPE whose ids follow the Chameleon layout.

    Args:
        texts: the training corpus, one document per item.
        vocab_size: total vocabulary size, special and image tokens included (65536 officially). The
            result is smaller if the corpus has too few distinct merges to fill it.
        codebook_size: number of image codes K (8192 officially).
        num_reserved: reserved tokens after ``<racm3:break>``; default 1024 for K = 8192, else 16.
        min_frequency: minimum count of a pair to be merged.
    """
    if num_reserved is None:
        num_reserved = _default_num_reserved(codebook_size)
    specials = special_tokens(codebook_size, num_reserved)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(specials) + len(alphabet):
        raise ValueError(
            f"vocab_size {vocab_size} is too small: {len(specials)} special/image tokens + "
            f"{len(alphabet)} byte symbols come first"
        )
    tok = _empty_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
        initial_alphabet=alphabet, show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    result = TextTokenizer(tok)
    if result.vocab.codebook_size != codebook_size or result.vocab.image_start != 4:
        raise RuntimeError("BPE training did not keep the special-token layout")  # library contract
    return result


_TOKENIZER_FILES = ("tokenizer.json", "text_tokenizer.json", "tokenizer/text_tokenizer.json")


def load_text_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """Load a tokenizer file, or find one in a folder (ours, Hugging Face's or Meta's layout: the
    ``data/`` root, its ``tokenizer/`` folder or a ``data/models/<size>/`` folder)."""
    path = Path(path)
    if path.is_dir():
        names = _TOKENIZER_FILES + (("../../tokenizer/text_tokenizer.json",)
                                    if (path / "params.json").is_file() else ())
        found = [path / name for name in names if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: no text tokenizer (looked for {', '.join(names)})")
        path = found[0]
    elif not path.is_file():
        raise FileNotFoundError(f"{path}: no such tokenizer file")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from e
    try:
        return TextTokenizer(tok)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
