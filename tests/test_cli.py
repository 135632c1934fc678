"""The console script."""


def test_quickstart_pipeline_end_to_end(tmp_path):
    """The whole quickstart at toy scale: every stage runs and writes what it promises."""
    import json

    from chameleon_lm import load_model
    from chameleon_lm.cli import main
    from chameleon_lm.quickstart import QuickstartConfig, run

    cfg = QuickstartConfig(train_pairs=48, test_pairs=4, stories=6, text_docs=6, vq_steps=2,
                           model_steps=2, batch_size=4, model={"dim": 64, "n_layers": 1, "n_heads": 2,
                                                               "ffn_dim": 128})
    metrics = run(tmp_path, cfg, log=lambda *_: None)
    for key in ("text_to_image_accuracy", "image_to_text_accuracy", "text_to_image_accuracy_unseen",
                "image_to_text_accuracy_unseen", "vq_psnr", "vq_codebook_usage"):
        assert key in metrics
    assert metrics["judge_accuracy_real_seen"] == 1.0
    assert json.loads((tmp_path / "metrics.json").read_text())["n_test_pairs"] == 4
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 16 and "training_curves.png" in page
    assert (tmp_path / "training_curves.png").is_file()
    loaded = load_model(tmp_path / "model")
    assert loaded.image_tokenizer is not None and loaded.config.dim == 64
    assert main(["generate", "--model", str(tmp_path / "model"), "--prompt", "a red circle",
                 "--mode", "image", "--seed", "1", "--out", str(tmp_path / "gen")]) == 0
    assert (tmp_path / "gen" / "image_0.png").is_file()


def test_quickstart_mixture_trains_image_to_caption_pairs_on_the_caption():
    import torch

    from chameleon_lm import DocumentCodec
    from chameleon_lm.quickstart import QuickstartConfig, _training_documents
    from chameleon_lm.tokenizers.text import train_text_tokenizer
    from chameleon_lm.tokenizers.vocab import IMAGE, TEXT

    captions = ["a red circle", "a large blue square on the left", "a green ring"] * 4
    tok = train_text_tokenizer(captions, 300, codebook_size=16)
    codec = DocumentCodec(tok, image_seq_len=4)
    codes = torch.randint(0, 16, (len(captions), 4))
    pairs = [(None, c, None) for c in captions]
    for only in (True, False):
        cfg = QuickstartConfig(caption_dropout=0.0, caption_loss_only=only)
        docs = _training_documents(codec, pairs, codes, [], [], cfg)
        t2i, i2t = docs[0], docs[1]
        assert codec.decode(t2i.ids).parts[0].text == captions[0]
        assert t2i.loss_mask[t2i.modality == IMAGE].all()  # caption -> image: the image is trained
        first_text = int((i2t.modality == TEXT).nonzero()[0, 0])
        assert i2t.loss_mask[first_text:].all()  # image -> caption: the caption and </s> are
        assert i2t.loss_mask[:first_text].any() != only  # the image only without caption_loss_only


def test_cli_train_text_then_train_and_resume(tmp_path, capsys):
    import json

    import torch

    from chameleon_lm import Document, DocumentCodec, load_model, load_text_tokenizer
    from chameleon_lm.cli import main
    from chameleon_lm.data.tokens import TokenDocuments

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a red circle", "blue"] * 40))
    assert main(["tokenizer", "train-text", "--data", str(corpus), "--out", str(tmp_path / "tok"),
                 "--vocab-size", "400", "--codebook-size", "16"]) == 0
    tok = load_text_tokenizer(tmp_path / "tok")
    codec = DocumentCodec(tok, image_seq_len=4)
    docs = [codec.encode(Document.of("a red circle", torch.arange(4)), eos=True)] * 8
    TokenDocuments.from_encoded(docs).save(tmp_path / "tokens.safetensors")
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'model = "tiny"\ndata = "{tmp_path / "tokens.safetensors"}"\n'
                   f'tokenizers = "{tmp_path / "tok"}"\nout_dir = "{tmp_path / "run"}"\n'
                   'batch_size = 2\nseq_len = 32\nwarmup_steps = 1\n[model_overrides]\nn_layers = 1\n')
    assert main(["train", str(cfg), "steps=3", "--no-progress"]) == 0
    assert main(["train", str(cfg), "steps=5", "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step_0000003" in out
    loaded = load_model(tmp_path / "run" / "checkpoints" / "step_0000005")
    assert loaded.config.n_layers == 1 and loaded.config.vocab_size == len(tok)
    assert main(["train", str(cfg), "steps=oops"]) == 2  # clear error, no traceback
    assert main(["train", str(tmp_path / "missing.toml")]) == 2
