"""``chameleon quickstart --out DIR``: learn and generate end to end on the built-in shapes world.

1. write the shapes-world dataset (WebDataset pairs, OBELICS-style stories, text JSONL);
2. train the image tokenizer (VQGAN) on the training images, then the BPE on all training text;
3. tokenize a mixture of caption→image and image→caption pairs (captions dropped from 10 % of the
   caption→image pairs, so classifier-free guidance has an unconditional model), picture stories and
   text documents, and train a small Chameleon on it;
4. generate images for held-out captions and captions for held-out images, of seen and of unseen
   (colour, shape) combinations, and one picture story; judge images by exact pixel analysis;
5. write ``DIR/metrics.json``, ``DIR/report.html`` (images inline, training curves) and ``DIR/model``
   (``chameleon_lm.load_model`` / ``chameleon generate --model DIR/model``).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from chameleon_lm.checkpoints import save_model
from chameleon_lm.data.synth import ShapesWorld, parse_caption, read_interleaved, read_pairs, write_dataset
from chameleon_lm.data.tokens import TokenDocuments
from chameleon_lm.documents import Document, DocumentCodec, EncodedDocument, TextPart
from chameleon_lm.eval.shapes_judge import ShapesJudge, accuracy
from chameleon_lm.generation.engine import Done, generate_images, generate_text, stream
from chameleon_lm.generation.sampling import GenerationConfig, ImageSampling, TextSampling
from chameleon_lm.model import Chameleon
from chameleon_lm.tokenizers.images import preprocess
from chameleon_lm.tokenizers.text import iter_jsonl_texts, train_text_tokenizer
from chameleon_lm.tokenizers.vocab import TEXT
from chameleon_lm.training.trainer import Trainer, TrainConfig
from chameleon_lm.training.vq import VQTrainConfig, train_image_tokenizer


@dataclass
class QuickstartConfig:
    """The quickstart run. Defaults fit about 12 minutes on 2 CPU cores (see the README)."""

    seed: int = 0
    image_size: int = 32
    sizes: tuple[str, ...] = ("medium", "large")
    """Shape sizes of the world: at 32 px and 8x8 codes, a 9-px "small" ring or cross is below what a
    VQGAN trained for two minutes reconstructs (judge accuracy on its reconstructions: 0.79 with
    small shapes, 0.99 without)."""
    backgrounds: tuple[str, ...] = ("grey",)
    """Backgrounds of the world: every background multiplies the image codes a shape is drawn with,
    and so the data the model needs to learn shapes (see the README)."""
    jitter: float = 0.3
    """Pose jitter of the world (1 = the full world's offsets, scales and rotations): every pose
    variant is another set of edge codes to learn (text->image 0.195 at 1.0, 0.705 at 0.3, with
    ``snap``; see the README)."""
    snap: int = 4
    """Off-centre shapes sit whole image-token patches (4 px) from the centre, so a moved shape has
    the same codes, moved (the image tokenizer's encoder is patch-local)."""
    train_pairs: int = 10000
    test_pairs: int = 200
    stories: int = 1000
    text_docs: int = 1000
    vq_steps: int = 600
    bpe_vocab: int = 2048
    caption_dropout: float = 0.1
    caption_loss_only: bool = True
    """Image->caption pairs train the caption only, as a captioning objective: their images (half of
    all image tokens) would otherwise teach an image prior with no text before it, and the model
    then draws clean shapes that ignore the caption's shape word (see the README)."""
    model_steps: int = 3600
    batch_size: int = 16
    lr: float = 5e-3
    model: dict | None = None
    cfg_text: float = 1.5
    cfg_image: float = 1.0
    """Guidance for the text->image evaluation. Meta's 3.0/1.2 (the engine's defaults) over-sharpens
    this small model: on one trained model, text->image 0.715 at 3.0/1.2, 0.975 at 1.5/1.0 and at
    1.0/1.0 (no guidance), 0.92 at 2.0/1.0 with temperature 0.5 (see the README)."""


# A narrow shapes-32 VQGAN (0.5 M parameters, 8x8 = 64 codes of 512) with a patch-local encoder: the
# setting that trained best within minutes on 2 CPU cores in our sweeps (no discriminator, fast
# dead-code restarts), and whose codes a small model learns best (see PatchEncoder).
QUICKSTART_VQ = {"batch_size": 16, "lr": 2e-3, "betas": (0.9, 0.99), "disc_start": 0, "dead_code_every": 50,
                 "vq_overrides": {"ch": 32, "ch_mult": (1, 1, 2), "z_channels": 32, "embed_dim": 32,
                                  "encoder": "patch"}}
MODEL = {"dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": None, "ffn_dim": 352, "max_seq_len": 512}


def world_of(cfg: QuickstartConfig) -> ShapesWorld:
    return ShapesWorld(seed=cfg.seed, image_size=cfg.image_size, sizes=cfg.sizes,
                       backgrounds=cfg.backgrounds, jitter=cfg.jitter, snap=cfg.snap)


def run(out: Path, cfg: QuickstartConfig, log=print) -> dict:
    t_start = time.time()
    times: dict[str, float] = {}
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    def stage(name: str, t0: float) -> None:
        times[name] = round(time.time() - t0, 1)
        log(f"  ({times[name]} s)")

    # 1. data -----------------------------------------------------------------------------------
    t0 = time.time()
    log(f"[1/5] writing the shapes world to {out / 'data'}")
    data_dir = out / "data"
    write_dataset(data_dir, seed=cfg.seed, image_size=cfg.image_size, sizes=cfg.sizes,
                  backgrounds=cfg.backgrounds, jitter=cfg.jitter, snap=cfg.snap, n_train_pairs=cfg.train_pairs,
                  n_test_pairs=cfg.test_pairs, n_interleaved=cfg.stories,
                  n_interleaved_test=min(20, cfg.stories), n_text=cfg.text_docs, overwrite=True)
    world = world_of(cfg)
    train_pairs = list(read_pairs(sorted(str(p) for p in (data_dir / "pairs").glob("train-*.tar"))))
    stories = list(read_interleaved(data_dir / "interleaved" / "train.jsonl"))
    texts = list(iter_jsonl_texts([data_dir / "text" / "train.jsonl"]))
    tests = {split: list(read_pairs(sorted(str(p) for p in (data_dir / "pairs").glob(f"{split}-*.tar"))))
             for split in ("test_seen", "test_unseen")}
    stage("data", t0)

    # 2. tokenizers -----------------------------------------------------------------------------
    t0 = time.time()
    log("[2/5] training the image tokenizer (VQGAN) and the BPE")
    pixels = torch.stack([preprocess(img, cfg.image_size, "crop") for img, _, _ in train_pairs])
    eval_pixels = torch.stack([preprocess(img, cfg.image_size, "crop") for img, _, _ in tests["test_seen"]])
    vq_cfg = VQTrainConfig(steps=cfg.vq_steps, seed=cfg.seed, **QUICKSTART_VQ)
    image_tok, vq_metrics = train_image_tokenizer(pixels, vq_cfg, out_dir=out / "tokenizers",
                                                  eval_images=eval_pixels, log=log)
    corpus = texts + [c for _, c, _ in train_pairs]
    corpus += [s for st in stories for s in st.segments if isinstance(s, str)]
    text_tok = train_text_tokenizer(corpus, cfg.bpe_vocab, codebook_size=image_tok.codebook_size)
    text_tok.save(out / "tokenizers")
    codec = DocumentCodec(text_tok, image_tok)
    log(f"  VQ: PSNR {vq_metrics['psnr']:.2f} dB, SSIM {vq_metrics['ssim']:.3f}, codebook usage "
        f"{vq_metrics['codebook_usage']:.2f}; BPE: {len(text_tok)} ids")
    stage("tokenizers", t0)

    # 3. model ----------------------------------------------------------------------------------
    t0 = time.time()
    log("[3/5] tokenizing the training mixture and training the model")
    codes = _encode_all(image_tok, pixels)
    docs = _training_documents(codec, train_pairs, codes, stories, texts, cfg)
    data = TokenDocuments.from_encoded(docs)
    data.save(out / "tokens.safetensors")
    train_cfg = TrainConfig(
        model="tiny", model_overrides={**MODEL, **(cfg.model or {}), "vocab_size": len(text_tok)},
        steps=cfg.model_steps, batch_size=cfg.batch_size, seq_len=512, lr=cfg.lr, group_by_length=16,
        warmup_steps=max(cfg.model_steps // 50, 1), schedule="cosine", final_lr_ratio=0.1, z_loss=1e-4,
        out_dir=str(out / "train"), seed=cfg.seed, log_every=max(cfg.model_steps // 10, 1),
    )
    model = Chameleon(train_cfg.model_config())
    log(f"  {len(data)} documents, {data.num_tokens:,} tokens; model {model.config.num_params():,} "
        f"parameters, {cfg.model_steps} steps of {cfg.batch_size}")
    trainer = Trainer(train_cfg, model, data, text_tok.vocab.pad_id, text_tok, image_tok)
    history = trainer.fit(log=log)
    save_model(out / "model", model, text_tok, image_tok)
    stage("model", t0)

    # 4. generation and evaluation --------------------------------------------------------------
    t0 = time.time()
    log("[4/5] generating and judging")
    metrics, samples = evaluate(model, codec, tests, cfg)
    metrics = {"vq_psnr": vq_metrics["psnr"], "vq_ssim": vq_metrics["ssim"],
               "vq_codebook_usage": vq_metrics["codebook_usage"], **metrics}
    story = _story(model, codec, world, cfg)
    stage("evaluation", t0)

    # 5. report ---------------------------------------------------------------------------------
    metrics["seconds"] = {**times, "total": round(time.time() - t_start, 1)}
    metrics["n_test_pairs"] = cfg.test_pairs
    metrics["text_to_image_guidance"] = {"text": cfg.cfg_text, "image": cfg.cfg_image}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _write_report(out, metrics, history, samples, story)
    log(f"[5/5] done in {metrics['seconds']['total']} s: text->image {metrics['text_to_image_accuracy']:.3f} "
        f"(unseen {metrics['text_to_image_accuracy_unseen']:.3f}), image->text "
        f"{metrics['image_to_text_accuracy']:.3f} (unseen {metrics['image_to_text_accuracy_unseen']:.3f}); "
        f"report {out / 'report.html'}")
    return metrics


@torch.no_grad()
def evaluate(model: Chameleon, codec: DocumentCodec, tests: dict, cfg: QuickstartConfig) -> tuple[dict, dict]:
    """Captions -> images and images -> captions on the held-out pairs of each split, judged."""
    model.eval()
    judge = ShapesJudge(world_of(cfg))
    gen = GenerationConfig(seed=cfg.seed, max_new_tokens=48,
                           text=TextSampling(greedy=True, repetition_penalty=1.0),
                           image=ImageSampling(temperature=0.7, top_p=0.9, cfg_text=cfg.cfg_text,
                                               cfg_image=cfg.cfg_image))
    metrics: dict = {}
    samples: dict = {}
    for split, pairs in tests.items():
        key = "seen" if split == "test_seen" else "unseen"
        labels = [lab for _, _, lab in pairs]
        real = [img for img, _, _ in pairs]
        codes = _encode_all(codec.image, torch.stack([preprocess(i, cfg.image_size, "crop") for i in real]))
        recon = codec.image.decode(codes)
        metrics[f"judge_accuracy_real_{key}"] = accuracy(judge.predict(real), labels)["both"]
        metrics[f"judge_accuracy_vq_reconstruction_{key}"] = accuracy(judge.predict(recon), labels)["both"]
        # caption -> image
        prompts = [[codec.text.vocab.bos_id] + codec.text.encode(c) for _, c, _ in pairs]
        images = []
        for s in range(0, len(prompts), 100):
            images += codec.image.decode(generate_images(model, codec.text.vocab, prompts[s : s + 100],
                                                         gen, codec.image.num_tokens))
        t2i = accuracy(judge.predict(images), labels)
        metrics[f"text_to_image_accuracy_{key}"] = t2i["both"]
        metrics[f"text_to_image_{key}_detail"] = t2i
        # image -> caption
        prompts = [codec.encode(Document.of(c)).ids.tolist() for c in codes]
        captions = [codec.text.decode([t for t in row if t != codec.text.vocab.eos_id])
                    for row in generate_text(model, codec.text.vocab, prompts, gen)]
        parsed = [parse_caption(c) or {"colour": None, "shape": None} for c in captions]
        i2t = accuracy([(p.get("colour"), p.get("shape")) for p in parsed], labels)
        metrics[f"image_to_text_accuracy_{key}"] = i2t["both"]
        metrics[f"image_to_text_{key}_detail"] = i2t
        samples[key] = [(pairs[i][1], images[i], real[i], captions[i], labels[i])
                        for i in range(min(12, len(pairs)))]
    metrics["text_to_image_accuracy"] = metrics["text_to_image_accuracy_seen"]
    metrics["image_to_text_accuracy"] = metrics["image_to_text_accuracy_seen"]
    return metrics, samples


@torch.no_grad()
def _encode_all(image_tok, pixels: torch.Tensor, batch: int = 512) -> torch.Tensor:
    return torch.cat([image_tok.vqgan.encode(pixels[s : s + batch]) for s in range(0, len(pixels), batch)])


def _training_documents(codec: DocumentCodec, pairs, codes, stories, texts, cfg) -> list[EncodedDocument]:
    rng = random.Random(cfg.seed)
    docs = []
    for (_, caption, _), c in zip(pairs, codes):
        t2i = Document.of(caption, c) if rng.random() >= cfg.caption_dropout else Document.of(c)
        docs.append(codec.encode(t2i, eos=True))
        i2t = codec.encode(Document.of(c, caption), eos=True)
        if cfg.caption_loss_only:
            i2t = _loss_from_first_text(i2t)
        docs.append(i2t)
    story_images = [s for st in stories for s in st.segments if not isinstance(s, str)]
    story_codes = iter(_encode_all(codec.image, torch.stack(
        [preprocess(img, cfg.image_size, "crop") for img in story_images])) if story_images else [])
    for st in stories:
        parts = [s if isinstance(s, str) else next(story_codes) for s in st.segments]
        docs.append(codec.encode(Document.of(*parts), eos=True))
    docs += [codec.encode(Document.of(t), eos=True) for t in texts]
    return docs


def _loss_from_first_text(doc: EncodedDocument) -> EncodedDocument:
    """The document with its loss on the tokens from the first text token on (the caption)."""
    first = int((doc.modality == TEXT).nonzero()[0, 0])
    mask = doc.loss_mask.clone()
    mask[:first] = False
    return EncodedDocument(doc.ids, doc.modality, mask)


def _story(model, codec: DocumentCodec, world: ShapesWorld, cfg: QuickstartConfig) -> list:
    """One interleaved generation from the opening sentence of a held-out story."""
    opening = next(s for s in world.interleaved("test_seen", 1, seed=cfg.seed)[0].segments
                   if isinstance(s, str))
    config = GenerationConfig(mode="interleaved", seed=cfg.seed, max_new_tokens=400,
                              text=TextSampling(temperature=0.7, repetition_penalty=1.0),
                              image=ImageSampling(cfg_text=cfg.cfg_text, cfg_image=cfg.cfg_image))
    done = [e for e in stream(model, codec, Document.of(opening), config) if isinstance(e, Done)][0]
    return [opening] + [p.text if isinstance(p, TextPart) else p.image for p in done.document.parts]


def _png_data_uri(img: Image.Image, scale: int = 3) -> str:
    buf = io.BytesIO()
    img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _curves_png(history: list[dict], path: Path) -> None:
    """Training curves (total, text and image CE) drawn with PIL."""
    w, h, m = 720, 360, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    series = {"ce": (30, 30, 30), "ce_text": (30, 90, 220), "ce_image": (220, 60, 30)}
    vals = [v for s in series for r in history for v in [r[s]] if v == v]
    top, n = max(vals), len(history)
    d.rectangle([m, m // 2, w - m // 2, h - m], outline=(160, 160, 160))
    for name, colour in series.items():
        pts = [(m + (w - 1.5 * m) * i / max(n - 1, 1), h - m - (h - 1.5 * m) * r[name] / top)
               for i, r in enumerate(history) if r[name] == r[name]]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
    for i, (name, colour) in enumerate(series.items()):
        d.text((m + 10 + 110 * i, m // 2 + 6), name, fill=colour)
    d.text((4, m // 2), f"{top:.1f}", fill=(0, 0, 0))
    d.text((4, h - m - 8), "0", fill=(0, 0, 0))
    d.text((w // 2 - 20, h - m + 8), f"step (0..{n})", fill=(0, 0, 0))
    img.save(path)


def _write_report(out: Path, metrics: dict, history, samples, story) -> None:
    _curves_png(history, out / "training_curves.png")
    rows = []
    for key, items in samples.items():
        cells = "".join(
            f"<figure><img src='{_png_data_uri(gen)}'><img src='{_png_data_uri(real)}'>"
            f"<figcaption><b>prompt:</b> {html.escape(cap)}<br><b>caption of the real image:</b> "
            f"{html.escape(made)}<br><small>{lab['colour']} {lab['shape']}</small></figcaption></figure>"
            for cap, gen, real, made, lab in items)
        rows.append(f"<h3>{key} combinations (left: generated from the prompt, right: a real image "
                    f"of it, captioned by the model)</h3><div class='grid'>{cells}</div>")
    story_html = "".join(
        f"<img src='{_png_data_uri(p)}'>" if isinstance(p, Image.Image) else f"<span>{html.escape(p)}</span>"
        for p in story)
    table = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>"
                    for k, v in metrics.items() if isinstance(v, float))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>chameleon-lm quickstart</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} .grid{{display:flex;flex-wrap:wrap;gap:12px}}
figure{{margin:0;width:220px}} figure img{{margin-right:4px}} figcaption{{font-size:12px}}
td{{padding:2px 10px;border-bottom:1px solid #ddd}} .story img{{vertical-align:middle;margin:4px}}</style></head>
<body><h1>chameleon-lm quickstart</h1>
<p>A small Chameleon trained from scratch on the built-in shapes world: image tokenizer, BPE and model.
Held-out test images; "unseen" combinations of colour and shape never appear in training.</p>
<h2>Metrics</h2><table>{table}</table><p>Time per stage (s): {html.escape(json.dumps(metrics['seconds']))}</p>
<h2>Training curves</h2><img src="training_curves.png" alt="training curves">
{''.join(rows)}
<h2>An interleaved generation</h2><p class="story">{story_html}</p></body></html>"""
    (out / "report.html").write_text(page)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quickstart", help="train and generate end to end on the built-in dataset")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-steps", type=int, default=QuickstartConfig.model_steps)
    p.add_argument("--vq-steps", type=int, default=QuickstartConfig.vq_steps)
    p.add_argument("--train-pairs", type=int, default=QuickstartConfig.train_pairs)
    p.add_argument("--test-pairs", type=int, default=QuickstartConfig.test_pairs)
    p.set_defaults(func=lambda a: run(a.out, QuickstartConfig(
        seed=a.seed, model_steps=a.model_steps, vq_steps=a.vq_steps, train_pairs=a.train_pairs,
        test_pairs=a.test_pairs)) and 0)
