"""Image captioning (CIDEr-D on COCO-format files) and VQA (VQAv2 accuracy) for a chameleon-lm model.

The prompt is the image followed by the text (``<s> <racm3:break> codes <eoss> text``), or, with
``chat``, the same user turn in the SFT layout ending ``<reserved08706>``. Generation is greedy with
no repetition penalty and a pinned seed, so a run is reproducible; the answer is the first line of the
generated text. ``chameleon eval caption`` and ``chameleon eval vqa`` write the results file in the
benchmark's own format next to a ``metrics.json``; ``--results`` scores an existing results file.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from chameleon_lm.documents import Document, DocumentCodec
from chameleon_lm.eval.metrics import write_json
from chameleon_lm.eval.metrics.captioning import (
    ImageId,
    load_coco_captions,
    load_coco_results,
    score_coco_results,
    write_coco_results,
)
from chameleon_lm.eval.metrics.vqa import (
    VQAQuestion,
    load_vqa_annotations,
    load_vqa_questions,
    load_vqa_results,
    score_vqa_results,
    write_vqa_results,
)
from chameleon_lm.eval.tasks import positive_int
from chameleon_lm.generation.engine import generate_text
from chameleon_lm.generation.sampling import GenerationConfig, TextSampling
from chameleon_lm.model import Chameleon
from chameleon_lm.tokenizers.images import open_image

DEFAULT_CAPTION_PROMPT = "A short caption of the image:"
DEFAULT_VQA_TEMPLATE = "Question: {question} Short answer:"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def benchmark_generation_config(seed: int, max_new_tokens: int) -> GenerationConfig:
    """Greedy text with no repetition penalty: the pinned settings of both benchmarks."""
    return GenerationConfig(seed=seed, max_new_tokens=max_new_tokens,
                            text=TextSampling(greedy=True, repetition_penalty=1.0))


def _codes(codec: DocumentCodec, images: Sequence[Image.Image | torch.Tensor], image_mode: str | None,
           batch_size: int) -> list[torch.Tensor]:
    """VQ codes of every image (tensors are taken as codes already), pixel images in batches."""
    pixels = [i for i, im in enumerate(images) if not isinstance(im, torch.Tensor)]
    if pixels and codec.image is None:
        raise ValueError("the codec has no image tokenizer to encode the images")
    out: list[torch.Tensor | None] = [im if isinstance(im, torch.Tensor) else None for im in images]
    for s in range(0, len(pixels), batch_size):
        idx = pixels[s : s + batch_size]
        for i, c in zip(idx, codec.image.encode([images[i] for i in idx], mode=image_mode).cpu()):
            out[i] = c
    return out  # type: ignore[return-value]


def _prompt_ids(codec: DocumentCodec, codes: torch.Tensor, text: str, chat: bool) -> list[int]:
    doc = Document.of(codes, text)
    enc = codec.encode_conversation([("user", doc)]) if chat else codec.encode(doc)
    return enc.ids.tolist()


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.strip().splitlines() if line.strip()), "")


@torch.no_grad()
def _generate(model: Chameleon, codec: DocumentCodec, images: Sequence[Image.Image | torch.Tensor],
              texts: Sequence[str], generation: GenerationConfig, batch_size: int, chat: bool,
              image_mode: str | None) -> list[str]:
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} prompts")
    model.eval()
    codes = _codes(codec, images, image_mode, batch_size)
    prompts = [_prompt_ids(codec, c, t, chat) for c, t in zip(codes, texts)]
    vocab = codec.text.vocab
    out: list[str] = []
    for s in range(0, len(prompts), batch_size):
        # the seed of each batch's first prompt moves on, so prompt i keeps seed + i across batches
        gen = generation if generation.seed is None else generation.replace(seed=generation.seed + s)
        rows = generate_text(model, vocab, prompts[s : s + batch_size], gen)
        out += [_first_line(codec.text.decode([t for t in row if t != vocab.eos_id])) for row in rows]
    return out


def caption_images(model: Chameleon, codec: DocumentCodec, images: Sequence[Image.Image | torch.Tensor],
                   prompt: str = DEFAULT_CAPTION_PROMPT, generation: GenerationConfig | None = None, *,
                   batch_size: int = 16, chat: bool = False, image_mode: str | None = None) -> list[str]:
    """One caption per image (PIL image, or its ``[N]`` VQ codes), the first generated line.

    ``generation`` defaults to :func:`benchmark_generation_config` (seed 0, 32 tokens); ``image_mode``
    (``crop``/``pad``) overrides the image tokenizer's preprocessing.
    """
    generation = generation or benchmark_generation_config(0, 32)
    return _generate(model, codec, images, [prompt] * len(images), generation, batch_size, chat,
                     image_mode)


def answer_questions(model: Chameleon, codec: DocumentCodec, images: Sequence[Image.Image | torch.Tensor],
                     questions: Sequence[str], prompt_template: str = DEFAULT_VQA_TEMPLATE,
                     generation: GenerationConfig | None = None, *, batch_size: int = 16,
                     chat: bool = False, image_mode: str | None = None) -> list[str]:
    """One answer per (image, question): ``prompt_template`` with ``{question}`` filled in."""
    if "{question}" not in prompt_template:
        raise ValueError(f"the prompt template {prompt_template!r} has no {{question}} field")
    generation = generation or benchmark_generation_config(0, 10)
    texts = [prompt_template.replace("{question}", q) for q in questions]
    return _generate(model, codec, images, texts, generation, batch_size, chat, image_mode)


# ------------------------------------------------------------------------------------- local runs


def _load(model_dir: str | os.PathLike, device: str):
    from chameleon_lm.checkpoints import load_model

    loaded = load_model(model_dir, device=device)
    if loaded.image_tokenizer is None:
        raise ValueError(f"{model_dir}: the model folder has no image tokenizer")
    return loaded.model, loaded.codec


def _write_metrics(out_dir: str | os.PathLike | None, metrics: dict[str, Any]) -> None:
    if out_dir is not None:
        write_json(Path(out_dir) / "metrics.json", metrics)


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")


def run_captioning(
    model_dir: str | os.PathLike | None,
    annotations_json: str | os.PathLike,
    images_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike | None,
    seed: int = 0,
    limit: int | None = None,
    prompt: str = DEFAULT_CAPTION_PROMPT,
    *,
    results_json: str | os.PathLike | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    chat: bool = False,
    image_mode: str | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Caption the annotated images (the first ``limit``) and score them with CIDEr-D.

    With ``results_json`` instead of a model, score that COCO results file (its first ``limit``
    entries) over its images, as COCO's evaluation does. Writes ``captions_results.json`` (model runs) and ``metrics.json`` in
    ``out_dir`` (when given) and returns the metrics.
    """
    _check_limit(limit)
    ann = load_coco_captions(annotations_json)
    settings: dict[str, Any] = {"annotations": str(annotations_json), "tokenizer": "PTB approximation"}
    if results_json is not None:
        if model_dir is not None:
            raise ValueError("give a model or a results file to score, not both")
        captions = dict(list(load_coco_results(results_json).items())[:limit])
        settings.update(results=str(results_json), limit=limit)
    else:
        if model_dir is None or images_dir is None or out_dir is None:
            raise ValueError("a captioning run needs a model, an images folder and an output folder")
        ids = [i for i in ann.file_names if i in ann.references][:limit]
        if not ids:
            raise ValueError(f"{annotations_json}: no image has both a file name and captions")
        images = [open_image(Path(images_dir) / ann.file_names[i]) for i in ids]
        model, codec = _load(model_dir, device)
        gen = benchmark_generation_config(seed, max_new_tokens)
        texts = caption_images(model, codec, images, prompt, gen, batch_size=batch_size, chat=chat,
                               image_mode=image_mode)
        captions = dict(zip(ids, texts))
        path = write_coco_results(Path(out_dir) / "captions_results.json", captions)
        settings.update(model=str(model_dir), images=str(images_dir), prompt=prompt, chat=chat,
                        image_mode=image_mode, limit=limit, generation=gen.to_dict(), results=str(path))
    scored = score_coco_results(captions, ann)
    metrics = {"task": "caption", "metric": "CIDEr-D", "score": scored["score"],
               "n_images": scored["n_images"], "seed": seed, "settings": settings}
    _write_metrics(out_dir, metrics)
    return metrics


def _image_index(images_dir: Path) -> dict[str, list[Path]]:
    """Image files by stem and by the number their stem ends with (``COCO_val2014_000000000042``)."""
    index: dict[str, list[Path]] = {}
    for p in sorted(images_dir.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            index.setdefault(p.stem, []).append(p)
            m = re.search(r"(\d+)$", p.stem)
            if m and str(int(m.group(1))) != p.stem:
                index.setdefault(str(int(m.group(1))), []).append(p)
    return index


def _find_image(images_dir: Path, index: dict[str, list[Path]], image_id: ImageId,
                pattern: str | None) -> Path:
    if pattern is not None:
        path = images_dir / pattern.format(image_id=image_id)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (image {image_id!r})")
        return path
    found = index.get(str(image_id), [])
    if len(found) != 1:
        what = "no file" if not found else f"{len(found)} files ({', '.join(p.name for p in found[:3])})"
        raise FileNotFoundError(f"{images_dir}: {what} for image {image_id!r}; name files by image id "
                                "(COCO's names work) or pass an image pattern")
    return found[0]


def run_vqa(
    model_dir: str | os.PathLike | None,
    questions_json: str | os.PathLike,
    annotations_json: str | os.PathLike,
    images_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike | None,
    seed: int = 0,
    limit: int | None = None,
    prompt_template: str = DEFAULT_VQA_TEMPLATE,
    *,
    results_json: str | os.PathLike | None = None,
    image_pattern: str | None = None,
    max_new_tokens: int = 10,
    batch_size: int = 16,
    chat: bool = False,
    image_mode: str | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Answer the first ``limit`` questions and score them with VQAv2 accuracy.

    Images are found in ``images_dir`` by ``image_pattern`` (e.g. ``"{image_id}.png"``) or, without
    one, by the number a file name ends with (COCO's ``COCO_val2014_000000000042.jpg`` is image 42).
    With ``results_json`` instead of a model, score that results file, which must answer exactly the
    (first ``limit``) questions. Writes ``vqa_results.json`` (model runs) and ``metrics.json`` in
    ``out_dir`` (when given) and returns the metrics.
    """
    _check_limit(limit)
    if results_json is None and "{question}" not in prompt_template:
        raise ValueError(f"the prompt template {prompt_template!r} has no {{question}} field")
    questions: list[VQAQuestion] = load_vqa_questions(questions_json)[:limit]
    annotations = load_vqa_annotations(annotations_json)
    settings: dict[str, Any] = {"questions": str(questions_json), "annotations": str(annotations_json),
                                "limit": limit}
    if results_json is not None:
        if model_dir is not None:
            raise ValueError("give a model or a results file to score, not both")
        answers = load_vqa_results(results_json)
        settings["results"] = str(results_json)
    else:
        if model_dir is None or images_dir is None or out_dir is None:
            raise ValueError("a VQA run needs a model, an images folder and an output folder")
        folder = Path(images_dir)
        index = _image_index(folder) if image_pattern is None else {}
        model, codec = _load(model_dir, device)
        # each image is tokenized once, however many questions it has
        image_ids = list(dict.fromkeys(q.image_id for q in questions))
        pixels = [open_image(_find_image(folder, index, i, image_pattern)) for i in image_ids]
        codes = dict(zip(image_ids, _codes(codec, pixels, image_mode, batch_size)))
        gen = benchmark_generation_config(seed, max_new_tokens)
        texts = answer_questions(model, codec, [codes[q.image_id] for q in questions],
                                 [q.question for q in questions], prompt_template, gen,
                                 batch_size=batch_size, chat=chat)
        answers = {q.question_id: a for q, a in zip(questions, texts)}
        path = write_vqa_results(Path(out_dir) / "vqa_results.json", answers)
        settings.update(model=str(model_dir), images=str(images_dir), prompt_template=prompt_template,
                        chat=chat, image_mode=image_mode, generation=gen.to_dict(), results=str(path))
    scored = score_vqa_results(answers, annotations, questions)
    metrics = {"task": "vqa", "metric": "VQAv2 accuracy", "score": scored["accuracy"],
               "per_answer_type": scored["per_answer_type"],
               "per_question_type": scored["per_question_type"],
               "n_questions": scored["n_questions"], "seed": seed, "settings": settings}
    _write_metrics(out_dir, metrics)
    return metrics


# -------------------------------------------------------------------------------------------- CLI


def _cli_caption(args: argparse.Namespace) -> int:
    m = run_captioning(args.model, args.annotations, args.images, args.out, args.seed, args.limit,
                       args.prompt, results_json=args.results, max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, chat=args.chat, image_mode=args.image_mode,
                       device=args.device)
    print(f"CIDEr-D {m['score']:.4f} over {m['n_images']} images"
          + (f"; wrote {Path(args.out) / 'metrics.json'}" if args.out else ""))
    return 0


def _cli_vqa(args: argparse.Namespace) -> int:
    m = run_vqa(args.model, args.questions, args.annotations, args.images, args.out, args.seed,
                args.limit, args.prompt, results_json=args.results, image_pattern=args.image_pattern,
                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, chat=args.chat,
                image_mode=args.image_mode, device=args.device)
    types = ", ".join(f"{t} {v:.4f}" for t, v in m["per_answer_type"].items())
    print(f"VQA accuracy {m['score']:.4f} over {m['n_questions']} questions"
          + (f" ({types})" if types else "")
          + (f"; wrote {Path(args.out) / 'metrics.json'}" if args.out else ""))
    return 0


def _common(p: argparse.ArgumentParser, tokens: int) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model folder (any layout load_model reads)")
    src.add_argument("--results", help="score this results file instead of running a model")
    p.add_argument("--images", help="folder of the images (needed with --model)")
    p.add_argument("--out", help="folder for the results file and metrics.json (needed with --model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N items")
    p.add_argument("--max-new-tokens", type=positive_int, default=tokens)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--chat", action="store_true", help="prompt in the SFT chat layout")
    p.add_argument("--image-mode", choices=("crop", "pad"), default=None,
                   help="image preprocessing (default: the image tokenizer's own, Meta's crop)")
    p.add_argument("--device", default="cpu")


def add_cli(ev: argparse._SubParsersAction) -> None:
    """Register ``caption`` and ``vqa`` on the ``chameleon eval`` subcommands."""
    p = ev.add_parser("caption", help="image captioning on COCO-format files, scored with CIDEr-D",
                      description="Caption the images of a COCO captions file and score the captions "
                                  "with CIDEr-D (greedy decoding, pinned seed), or score a results file.")
    _common(p, 32)
    p.add_argument("--annotations", required=True, help="COCO captions annotation file")
    p.add_argument("--prompt", default=DEFAULT_CAPTION_PROMPT, help="text after the image")
    p.set_defaults(func=_cli_caption)
    p = ev.add_parser("vqa", help="visual question answering on VQAv2-format files",
                      description="Answer the questions of a VQAv2 questions file and score the answers "
                                  "with VQAv2 accuracy (greedy decoding, pinned seed), or score a "
                                  "results file.")
    _common(p, 10)
    p.add_argument("--questions", required=True, help="VQAv2 questions file")
    p.add_argument("--annotations", required=True, help="VQAv2 annotations file")
    p.add_argument("--prompt", default=DEFAULT_VQA_TEMPLATE,
                   help="text after the image, with a {question} field")
    p.add_argument("--image-pattern", default=None,
                   help="image file name from its id, e.g. '{image_id}.png' (default: the number a "
                        "file name ends with)")
    p.set_defaults(func=_cli_vqa)
