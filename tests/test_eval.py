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
