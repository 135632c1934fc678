"""CIDEr-D as the COCO caption evaluation computes it, a Java-free PTB tokenizer, and COCO file loaders.

:func:`cider_d` reproduces ``pycocoevalcap.cider`` (which is CIDEr-D): n-grams 1..4 weighted by
TF-IDF, the document frequency counted over the evaluated images' reference sets, candidate weights
clipped by the reference's, a Gaussian length penalty (sigma 6), the mean over n-gram orders and over
references, ×10, and the mean over images. As in ``COCOEvalCap``, the corpus is the images of the
results: references of other images are ignored.

:func:`tokenize` approximates the Stanford PTB tokenizer (``-lowerCase``) followed by the removal of
``PTBTokenizer.PUNCTUATIONS`` that ``COCOEvalCap`` applies to both sides: lowercase; typographic
quotes, dashes and ellipses to ASCII; split off punctuation, brackets, quotes, ``$``, ``%`` and the
clitics ``n't 's 're 've 'll 'd 'm``; keep the
periods of a short list of abbreviations and of dotted acronyms; drop the listed punctuation tokens.
Brackets come out as ``-lrb-`` etc. and stay, as in the official pipeline (its list spells them in
upper case, the lowercased tokenizer writes them in lower case).
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chameleon_lm.eval.metrics import load_results, write_results
from chameleon_lm.utils.weights import read_json

ImageId = int | str
NGram = tuple[str, ...]

PTB_PUNCTUATIONS = frozenset({"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                              ".", "?", "!", ",", ":", "-", "--", "...", ";"})
"""The tokens ``pycocoevalcap.tokenizer.ptbtokenizer`` removes after tokenizing."""

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_ABBREVIATIONS = frozenset({"mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "co.", "corp.", "inc.",
                            "ltd.", "vs.", "etc.", "mt.", "ave.", "jan.", "feb.", "aug.", "sept.",
                            "oct.", "nov.", "dec.", "prof.", "gen.", "capt.", "sgt.", "lt."})
# PTB's split of a few fused words
_FUSED = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
          "wanna": ("wan", "na"), "gimme": ("gim", "me"), "lemme": ("lem", "me"), "y'all": ("y'", "all")}
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
# PTB normalises typographic quotes, dashes and ellipses to their ASCII forms
_ASCII = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                        "\u2013": " -- ", "\u2014": " -- ", "\u2026": " ... "})
# split everywhere: these never join a word in PTB's output
_ALWAYS = re.compile(r"(\.\.\.|--|[;\"()\[\]{}`]|''|\$)")
# commas and colons stay inside numbers (1,000 and 10:30)
_NUMBER_PUNCT = re.compile(r"(?<!\d)([,:])|([,:])(?!\d)")


def _split_token(tok: str) -> list[str]:
    """PTB-style pieces of one whitespace token (already lowercased, ``_ALWAYS`` split off)."""
    head: list[str] = []
    tail: list[str] = []
    # an opening single quote (not a clitic such as 's) is a quote mark
    while tok.startswith("'") and len(tok) > 1 and not _CLITIC.match("x" + tok):
        head.append("`")
        tok = tok[1:]
    while tok:
        # a run of ! or ? is one token (PTB keeps "!!"), split off only at the end of a word
        marks = re.search(r"[?!]+$", tok)
        if marks and marks.start() > 0:
            tail.insert(0, marks.group())
            tok = tok[: marks.start()]
        elif tok[-1] in "'%/" and len(tok) > 1:
            tail.insert(0, tok[-1])
            tok = tok[:-1]
        elif tok.endswith(".") and len(tok) > 1 and tok not in _ABBREVIATIONS \
                and not re.fullmatch(r"([a-z]\.){2,}", tok):
            tail.insert(0, ".")
            tok = tok[:-1]
        else:
            break
    if tok in _FUSED:
        return head + list(_FUSED[tok]) + tail
    m = _CLITIC.match(tok)
    if m and m.group(1) not in ("'", "n"):
        return head + [m.group(1), m.group(2)] + tail
    return head + ([tok] if tok else []) + tail


def tokenize(text: str) -> list[str]:
    """COCO's caption tokenization (PTB tokenizer, lowercased, punctuation removed), approximately."""
    text = _ALWAYS.sub(r" \1 ", text.lower().replace("\n", " ").translate(_ASCII))
    text = _NUMBER_PUNCT.sub(lambda m: f" {m.group(1) or m.group(2)} ", text)
    out: list[str] = []
    for tok in text.split():
        if tok in _BRACKETS:
            out.append(_BRACKETS[tok])
        elif tok in PTB_PUNCTUATIONS or tok == '"':
            continue
        else:
            out += [t for t in _split_token(tok) if t not in PTB_PUNCTUATIONS]
    return out


# ------------------------------------------------------------------------------------------ CIDEr-D


def _ngrams(words: Sequence[str], n: int = 4) -> Counter[NGram]:
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _vector(counts: Counter[NGram], df: Mapping[NGram, float], log_n: float, n: int
            ) -> tuple[list[dict[NGram, float]], list[float], int]:
    """TF-IDF weights per n-gram order, their norms, and pycocoevalcap's length (the bigram count)."""
    vec: list[dict[NGram, float]] = [{} for _ in range(n)]
    norm = [0.0] * n
    length = 0
    for gram, tf in counts.items():
        w = tf * (log_n - math.log(max(1.0, df.get(gram, 0.0))))
        vec[len(gram) - 1][gram] = w
        norm[len(gram) - 1] += w * w
        # pycocoevalcap counts bigrams here (its ``n == 1`` is the 0-based order); kept for parity
        if len(gram) == 2:
            length += tf
    return vec, [math.sqrt(x) for x in norm], length


def _similarity(hyp: tuple, ref: tuple, n: int, sigma: float) -> float:
    """Sum over n-gram orders of the clipped cosine similarity times the length penalty."""
    vec_h, norm_h, len_h = hyp
    vec_r, norm_r, len_r = ref
    penalty = math.exp(-((len_h - len_r) ** 2) / (2 * sigma**2))
    total = 0.0
    for k in range(n):
        val = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec_h[k].items())
        if norm_h[k] != 0 and norm_r[k] != 0:
            val /= norm_h[k] * norm_r[k]
        total += val * penalty
    return total


def cider_d(
    candidates: Mapping[ImageId, str],
    references: Mapping[ImageId, Sequence[str]],
    *,
    tokenizer: Callable[[str], list[str]] | None = tokenize,
    n: int = 4,
    sigma: float = 6.0,
) -> dict[str, Any]:
    """Corpus CIDEr-D of one caption per image against each image's references.

    Args:
        candidates: image id → generated caption; these images are the corpus.
        references: image id → reference captions (must cover every candidate's image).
        tokenizer: turns a caption into words; None splits on whitespace (already tokenized text,
            as ``pycocoevalcap.cider.Cider`` takes it).
        n: highest n-gram order.
        sigma: standard deviation of the length penalty.

    Returns:
        ``score`` (the mean over images), ``per_image`` (image id → score) and ``n_images``.
    """
    if not candidates:
        raise ValueError("no candidate captions to score")
    missing = [i for i in candidates if not references.get(i)]
    if missing:
        raise ValueError(f"{len(missing)} candidate image id(s) have no reference captions, e.g. "
                         f"{missing[:5]}")
    split = tokenizer if tokenizer is not None else str.split
    ids = list(candidates)
    hyp = {i: _ngrams(split(candidates[i]), n) for i in ids}
    refs = {i: [_ngrams(split(r), n) for r in references[i]] for i in ids}
    df: Counter[NGram] = Counter()
    for i in ids:
        df.update(set().union(*refs[i]))
    log_n = math.log(len(ids))
    per_image: dict[ImageId, float] = {}
    for i in ids:
        h = _vector(hyp[i], df, log_n, n)
        total = sum(_similarity(h, _vector(r, df, log_n, n), n, sigma) for r in refs[i])
        per_image[i] = total / n / len(refs[i]) * 10.0
    return {"score": sum(per_image.values()) / len(ids), "per_image": per_image, "n_images": len(ids)}


# ------------------------------------------------------------------------------------ COCO files


@dataclass
class CocoCaptions:
    """A COCO-format captions annotation file."""

    file_names: dict[ImageId, str]
    """Image id → file name (relative to the images folder)."""
    references: dict[ImageId, list[str]]
    """Image id → its reference captions, in file order."""


def _fail(path: str | os.PathLike, what: str) -> ValueError:
    return ValueError(f"{path}: {what}")


def load_coco_captions(path: str | os.PathLike) -> CocoCaptions:
    """Read ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise _fail(path, "not a COCO captions file (expected an object with an 'annotations' list)")
    file_names: dict[ImageId, str] = {}
    for k, img in enumerate(data.get("images", [])):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise _fail(path, f"images[{k}] needs 'id' and 'file_name'")
        file_names[img["id"]] = img["file_name"]
    references: dict[ImageId, list[str]] = {}
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise _fail(path, f"annotations[{k}] needs 'image_id' and a string 'caption'")
        if file_names and ann["image_id"] not in file_names:
            raise _fail(path, f"annotations[{k}]: image id {ann['image_id']!r} is not in 'images'")
        references.setdefault(ann["image_id"], []).append(ann["caption"])
    if not references:
        raise _fail(path, "no captions")
    return CocoCaptions(file_names, references)


def load_coco_results(path: str | os.PathLike) -> dict[ImageId, str]:
    """Read a results file ``[{"image_id", "caption"}]`` (one caption per id)."""
    return load_results(path, "image_id", "caption")


def write_coco_results(path: str | os.PathLike, captions: Mapping[ImageId, str]) -> Path:
    """Write ``[{"image_id", "caption"}]`` (the format :func:`load_coco_results` and the official tools read)."""
    return write_results(path, captions, "image_id", "caption")


def score_coco_results(results: Mapping[ImageId, str], annotations: CocoCaptions) -> dict[str, Any]:
    """CIDEr-D of a results mapping against an annotation file; unknown image ids are an error."""
    unknown = [i for i in results if i not in annotations.references]
    if unknown:
        raise ValueError(f"{len(unknown)} result image id(s) are not in the annotations, e.g. "
                         f"{unknown[:5]}")
    return cider_d(results, annotations.references)
