"""The console script."""


def test_cli_quickstart(tmp_path, capsys):
    from chameleon_lm.cli import main

    assert main(["quickstart", "--out", str(tmp_path)]) == 0
    assert "identical" in capsys.readouterr().out
    assert (tmp_path / "tokenizers" / "tokenizer.json").is_file()
    assert (tmp_path / "tokenizers" / "vqgan.safetensors").is_file()


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
