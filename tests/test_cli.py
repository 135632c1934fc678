"""The console script."""


def test_cli_quickstart(tmp_path, capsys):
    from chameleon_lm.cli import main

    assert main(["quickstart", "--out", str(tmp_path)]) == 0
    assert "identical" in capsys.readouterr().out
    assert (tmp_path / "tokenizers" / "tokenizer.json").is_file()
    assert (tmp_path / "tokenizers" / "vqgan.safetensors").is_file()
