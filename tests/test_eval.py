"""The shapes-world judge."""

from PIL import Image

from chameleon_lm.data.synth import ShapesWorld
from chameleon_lm.eval.shapes_judge import ShapesJudge, accuracy


def test_judge_reads_real_images_exactly():
    world = ShapesWorld(seed=0, image_size=32)
    judge = ShapesJudge(32)
    for split in ("test_seen", "test_unseen"):
        samples = world.pairs(split, 150, seed=3)
        acc = accuracy(judge.predict([img for img, _, _ in samples]), [lab for _, _, lab in samples])
        assert acc["both"] >= 0.99, (split, acc)


def test_judge_on_other_sizes_and_blank_images():
    world = ShapesWorld(seed=0, image_size=64)
    samples = world.pairs("train", 40, seed=1)
    acc = accuracy(ShapesJudge(64).predict([img for img, _, _ in samples]), [lab for _, _, lab in samples])
    assert acc["both"] >= 0.97
    colour, shape = ShapesJudge(32).read(Image.new("RGB", (32, 32), (128, 128, 128)))
    assert isinstance(colour, str) and isinstance(shape, str)


def test_judge_reads_shapes_moved_or_resized_off_the_nominal_pose():
    # generated images put the right shape a pixel or two off its nominal place, or larger/smaller
    world = ShapesWorld(seed=0, image_size=32, sizes=("medium", "large"), jitter=0.3, snap=4)
    judge = ShapesJudge(world)
    labels = [lab for _, _, lab in world.pairs("test_seen", 60, seed=2)]
    for dx, dy, scale in ((2, 0, 1.0), (-2, 1, 1.0), (0, 0, 1.18), (1, -2, 0.82)):
        moved = []
        for lab in labels:
            pose = dict(world.nominal_pose(lab["size"], lab["position"]))
            pose.update(dx=pose["dx"] + dx / 32, dy=pose["dy"] + dy / 32, scale=scale)
            moved.append(world.render({**lab, "pose": pose}))
        assert accuracy(judge.predict(moved), labels)["both"] >= 0.95, (dx, dy, scale)


def test_accuracy_counts():
    labels = [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "ring"}]
    assert accuracy([("red", "circle"), ("blue", "square")], labels) == {
        "colour": 1.0, "shape": 0.5, "both": 0.5}


def test_evaluate_pairs_scores_a_model_both_ways_and_the_cli_writes_metrics(tmp_path):
    import json

    from chameleon_lm import Chameleon, ChameleonConfig, VQGAN, VQGANConfig
    from chameleon_lm.checkpoints import save_model
    from chameleon_lm.cli import main
    from chameleon_lm.data.sources import open_source
    from chameleon_lm.data.synth import write_dataset
    from chameleon_lm.documents import DocumentCodec
    from chameleon_lm.eval.cli import pair_generation_config
    from chameleon_lm.eval.pairs import evaluate_pairs, load_pairs, score
    from chameleon_lm.eval.shapes_judge import ShapesPairJudge
    from chameleon_lm.tokenizers.image import ImageTokenizer
    from chameleon_lm.tokenizers.text import train_text_tokenizer

    write_dataset(tmp_path / "data", n_train_pairs=8, n_test_pairs=3, n_interleaved=0, n_interleaved_test=0,
                  n_text=0)
    pairs = load_pairs(open_source(str(tmp_path / "data" / "pairs" / "test_seen-000000.tar")))
    assert len(pairs) == 3 and pairs[0].meta["colour"] and pairs[0].image.size == (32, 32)
    vq = ImageTokenizer(VQGAN(VQGANConfig.preset("tiny")))
    tok = train_text_tokenizer([p.caption for p in pairs] * 20, 600, codebook_size=vq.codebook_size)
    model = Chameleon(ChameleonConfig.preset("tiny", vocab_size=len(tok), n_layers=1))
    judge = ShapesPairJudge.from_manifest(tmp_path / "data")
    metrics, samples = evaluate_pairs(model, DocumentCodec(tok, vq), pairs, judge,
                                      pair_generation_config(0, 1.5, 1.0, 0.7, 0.9, max_new_tokens=8))
    assert metrics["n_pairs"] == 3 and metrics["judge_real"]["all"] == 1.0
    assert set(metrics["text_to_image"]) == {"colour", "shape", "all"} and len(samples) == 3
    assert samples[0]["generated_image"].size == (32, 32)
    assert score([("red", "ring"), None], [("red", "ring"), ("blue", "ring")], ("colour", "shape")) == {
        "colour": 0.5, "shape": 0.5, "all": 0.5}
    save_model(tmp_path / "model", model, tok, vq)
    assert main(["eval", "pairs", "--model", str(tmp_path / "model"), "--manifest", str(tmp_path / "data"),
                 "--data", f"seen={tmp_path / 'data' / 'pairs' / 'test_seen-000000.tar'}",
                 "--limit", "2", "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (tmp_path / "eval" / "samples.html").read_text().count("data:image/png;base64,") == 4
    assert result["seen"]["n_pairs"] == 2 and result["seen"]["judge_real"]["all"] == 1.0


def judge_factory(manifest):
    """A user's judge, loaded by ``--judge module:factory`` (here: the shapes judge again)."""
    from chameleon_lm.eval.shapes_judge import ShapesPairJudge

    return ShapesPairJudge.from_manifest(manifest)


def test_a_pluggable_judge_loads_from_module_and_factory(tmp_path):
    import pytest

    from chameleon_lm.data.synth import write_dataset
    from chameleon_lm.eval.cli import load_judge

    write_dataset(tmp_path / "data", n_train_pairs=2, n_test_pairs=1, n_interleaved=0, n_interleaved_test=0,
                  n_text=0)
    judge = load_judge("test_eval:judge_factory", str(tmp_path / "data"))
    assert judge.attributes == ("colour", "shape")
    with pytest.raises(ValueError, match="has no (attributes|reference|read_images)"):
        load_judge("chameleon_lm.eval.shapes_judge:world_from_manifest", str(tmp_path / "data"))
    with pytest.raises(ValueError, match="module:factory"):
        load_judge("nonsense", None)
    with pytest.raises(ValueError, match="needs --manifest"):
        load_judge("shapes", None)
