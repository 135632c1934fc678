"""The console script."""


def test_quickstart_pipeline_end_to_end(tmp_path):
    """The whole quickstart at toy scale: every stage is a command, and each writes what it promises."""
    import json

    from chameleon_lm import load_model
    from chameleon_lm.cli import main
    from conftest import toy_quickstart_config

    from chameleon_lm.quickstart import run

    cfg = toy_quickstart_config()
    lines = []
    metrics = run(tmp_path, cfg, log=lines.append)
    for key in ("text_to_image_accuracy", "image_to_text_accuracy", "text_to_image_accuracy_unseen",
                "image_to_text_accuracy_unseen", "vq_psnr", "vq_codebook_usage", "val/caption-image/ce"):
        assert key in metrics
    assert metrics["judge_accuracy_real_seen"] == 1.0
    assert json.loads((tmp_path / "metrics.json").read_text())["n_test_pairs"] == 4
    script = (tmp_path / "commands.sh").read_text()
    assert script.count("chameleon ") == 10 and "chameleon data tokenize" in script
    assert all(line.split("] ", 1)[1] in script for line in lines if line.startswith("["))
    page = (tmp_path / "report.html").read_text()
    assert "eval/pairs/samples.html" in page and "training_curves.png" in page and "An interleaved generation" in page
    assert (tmp_path / "eval" / "pairs" / "samples.html").read_text().count("data:image/png;base64,") >= 16
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["results"]["pairs"]["seen"]["text_to_image"]["all"] == metrics["text_to_image_accuracy"]
    assert report["model_hash"].startswith("sha256:") and report["seed"] == 0
    ppl = report["results"]["perplexity"]["caption-image"]
    assert ppl["text"]["tokens"] > 0 and ppl["image"]["tokens"] > 0
    assert metrics["val_perplexity_caption-image_image"] == ppl["image"]["ppl"] > 1
    assert 0 < report["results"]["reconstruction"]["codebook_usage"] <= 1
    assert report["results"]["answers"]["answered"] == 12 and report["results"]["answers"]["errors"] == 0
    assert (tmp_path / "eval" / "report.html").is_file() and (tmp_path / "eval" / "answers.sqlite").is_file()
    train = json.loads((tmp_path / "train.json").read_text())
    assert train["data"]["sources"][0]["path"] == str(tmp_path / "tokens/pairs/caption-image")
    loaded = load_model(tmp_path / "model")
    assert loaded.image_tokenizer is not None and loaded.config.dim == 64
    assert main(["generate", "--model", str(tmp_path / "model"), "--prompt", "a red circle",
                 "--mode", "image", "--seed", "1", "--out", str(tmp_path / "gen")]) == 0
    assert (tmp_path / "gen" / "image_0.png").is_file()


def test_cli_train_text_then_tokenize_train_and_resume(tmp_path, capsys):
    import json

    from chameleon_lm import load_model, load_text_tokenizer
    from chameleon_lm.cli import main

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a red circle", "blue"] * 40))
    assert main(["tokenizer", "train-text", "--data", str(corpus), "--out", str(tmp_path / "tok"),
                 "--vocab-size", "400", "--codebook-size", "16"]) == 0
    tok = load_text_tokenizer(tmp_path / "tok")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"a red circle number {i}"}) + "\n" for i in range(20)))
    assert main(["data", "tokenize", "--data", str(docs), "--recipe", "text", "--tokenizers",
                 str(tmp_path / "tok"), "--out", str(tmp_path / "tokens"), "--no-progress"]) == 0
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'model = "tiny"\ndata = "{tmp_path / "tokens"}"\n'
                   f'tokenizers = "{tmp_path / "tok"}"\nout_dir = "{tmp_path / "run"}"\n'
                   f'export_dir = "{tmp_path / "model"}"\n'
                   'batch_size = 2\nseq_len = 32\nwarmup_steps = 1\n[model_overrides]\nn_layers = 1\n')
    assert main(["train", str(cfg), "steps=3", "--no-progress"]) == 0
    assert main(["train", str(cfg), "steps=5", "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step_0000003" in out and "20 documents" in out
    loaded = load_model(tmp_path / "run" / "checkpoints" / "step_0000005")
    assert loaded.config.n_layers == 1 and loaded.config.vocab_size == len(tok)
    assert load_model(tmp_path / "model").config.n_layers == 1
    assert main(["train", str(cfg), "steps=oops"]) == 2  # clear error, no traceback
    assert main(["train", str(tmp_path / "missing.toml")]) == 2
    assert main(["train", str(cfg), f"data={tmp_path / 'nowhere'}"]) == 2


def test_shipped_configs_parse():
    from importlib import resources

    from chameleon_lm.training.cli import load_train_config
    from chameleon_lm.training.vqgan import VQTrainConfig
    from chameleon_lm.utils.config import read_config_file

    folder = resources.files("chameleon_lm") / "configs"
    train = sorted(str(p) for sub in ("examples", "quickstart") for p in (folder / sub).iterdir()
                   if p.name.endswith(".toml") and p.name not in ("vq.toml", "eval.toml"))
    assert len(train) == 3
    from chameleon_lm.eval.report import SECTIONS

    ev = read_config_file(folder / "quickstart" / "eval.toml")
    assert {"pairs", "perplexity", "reconstruction", "answers"} <= set(ev) <= {"model", "out", "seed", *SECTIONS}
    from pathlib import Path

    from chameleon_lm.quickstart import QuickstartConfig, eval_config

    filled = eval_config(Path("runs/qs"), QuickstartConfig())  # a relative --out, as in the README
    assert filled["model"] == str(Path("runs/qs/model").resolve())
    assert all(Path(p).is_absolute() for p in filled["pairs"]["data"].values())
    for path in train:
        cfg = load_train_config(path, [])
        assert cfg.data is not None and cfg.data.sources and cfg.val
    stages = load_train_config(str(folder / "examples" / "interleaved.toml"), []).data
    assert stages.weights_at(0)["sft"] == 0 and stages.weights_at(80000) == {
        "text": 1.45, "pairs": 0.75, "interleaved": 0.2, "sft": 1.0}
    assert VQTrainConfig.from_dict(read_config_file(folder / "quickstart" / "vq.toml")).vq_config().encoder == "patch"
