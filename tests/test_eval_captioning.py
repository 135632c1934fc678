"""CIDEr-D, VQAv2 accuracy, and the captioning/VQA tasks run on a tiny random model."""

import json
import math
import random
import shutil
from pathlib import Path

import pytest
from conftest import tiny_model, write_tiny_tokenizers

from chameleon_lm.cli import main
from chameleon_lm.eval.metrics.captioning import (
    cider_d,
    load_coco_captions,
    load_coco_results,
    score_coco_results,
    tokenize,
)
from chameleon_lm.eval.metrics.vqa import (
    load_vqa_annotations,
    load_vqa_questions,
    load_vqa_results,
    normalize_answer,
    process_punctuation,
    question_accuracy,
    score_vqa_results,
    vqa_accuracy,
)

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
CAPTIONS = FIXTURES / "captions.json"
IMAGES = FIXTURES / "images"


# ------------------------------------------------------------------------------------------ CIDEr-D


def _pycoco_cider(candidates, references):
    from pycocoevalcap.cider.cider import Cider

    score, per = Cider().compute_score({i: list(r) for i, r in references.items()},
                                       {i: [c] for i, c in candidates.items()})
    return float(score), [float(x) for x in per]


def test_cider_d_matches_pycocoevalcap_on_the_fixture_captions():
    ann = load_coco_captions(CAPTIONS)
    results = load_coco_results(FIXTURES / "captions_results.json")
    refs = {i: [" ".join(tokenize(r)) for r in ann.references[i]] for i in results}
    cands = {i: " ".join(tokenize(c)) for i, c in results.items()}
    ours = cider_d(cands, refs, tokenizer=None)
    theirs, per = _pycoco_cider(cands, refs)
    assert abs(ours["score"] - theirs) < 1e-9
    assert all(abs(ours["per_image"][i] - p) < 1e-9 for i, p in zip(refs, per))
    # the loaders and the default tokenizer give the same, known score
    assert abs(score_coco_results(results, ann)["score"] - 2.8388134507652087) < 1e-9
    assert ann.file_names[2] == "COCO_val2014_000000000002.png" and len(ann.references[3]) == 5


def test_cider_d_matches_pycocoevalcap_on_random_corpora():
    rng = random.Random(0)
    words = ["a", "the", "man", "dog", "cat", "on", "in", "sitting", "red", "blue", "table", "of", "with"]
    for _ in range(30):
        n = rng.randint(1, 6)
        refs = {i: [" ".join(rng.choices(words, k=rng.randint(0, 9))) for _ in range(rng.randint(1, 5))]
                for i in range(n)}
        cands = {i: " ".join(rng.choices(words, k=rng.randint(0, 9))) for i in range(n)}
        assert abs(cider_d(cands, refs, tokenizer=None)["score"] - _pycoco_cider(cands, refs)[0]) < 1e-9


def test_cider_d_hand_computed_cases():
    # one image: log(N refs) = log 1 = 0 and every n-gram has df 1, so every weight is
    # log 1 - log 1 = 0 and even a perfect caption scores 0
    assert cider_d({1: "a red circle"}, {1: ["a red circle", "a red circle"]})["score"] == 0.0
    # two images, each n-gram in one reference set: every weight is log 2 - log 1; a perfect
    # four-word caption has cosine 1 at each of the 4 orders, no length penalty: 10 * 4/4 = 10
    perfect = cider_d({1: "a b c d", 2: "e f g h"}, {1: ["a b c d"], 2: ["e f g h"]})
    assert perfect["per_image"] == pytest.approx({1: 10.0, 2: 10.0}, abs=1e-12)
    # clipping (the "-D"): "a a" against "a b", weights w = log 2. Unigrams: hyp a=2w, ref a=w, b=w;
    # clipped dot min(2w, w)*w = w^2 over norms 2w * sqrt(2)w gives 1/(2 sqrt 2) (unclipped:
    # 1/sqrt 2). Bigrams share nothing; no 3- or 4-grams. 10 * (1/(2 sqrt 2)) / 4 = 10/(8 sqrt 2)
    clipped = cider_d({1: "a a", 2: "c d e f"}, {1: ["a b"], 2: ["c d e f"]}, tokenizer=None)
    assert clipped["per_image"][1] == pytest.approx(10 / (8 * math.sqrt(2)), abs=1e-12)
    assert clipped["score"] == pytest.approx((10 + 10 / (8 * math.sqrt(2))) / 2, abs=1e-12)
    assert clipped["score"] == pytest.approx(_pycoco_cider({1: "a a", 2: "c d e f"},
                                                           {1: ["a b"], 2: ["c d e f"]})[0], abs=1e-12)


def test_cider_d_errors():
    with pytest.raises(ValueError, match="no reference"):
        cider_d({1: "a", 7: "b"}, {1: ["a"]})
    with pytest.raises(ValueError, match="not in the annotations"):
        score_coco_results({99: "a dog"}, load_coco_captions(CAPTIONS))


def test_tokenize_follows_the_ptb_tokenizer_and_punctuation_removal():
    assert tokenize("A dog's toy, on the floor.") == ["a", "dog", "'s", "toy", "on", "the", "floor"]
    assert tokenize("Two people (a man) don't smile!") == [
        "two", "people", "-lrb-", "a", "man", "-rrb-", "do", "n't", "smile"]
    assert tokenize("It's 10:30 and 1,000 people; 3.5 cats...") == [
        "it", "'s", "10:30", "and", "1,000", "people", "3.5", "cats"]
    assert tokenize("Mr. Smith in the U.S. -- a black-and-white photo") == [
        "mr.", "smith", "in", "the", "u.s.", "a", "black-and-white", "photo"]


@pytest.mark.skipif(shutil.which("java") is None, reason="the Stanford PTB tokenizer needs java")
def test_tokenize_equals_the_official_java_tokenizer_on_the_fixture_captions():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ann = load_coco_captions(CAPTIONS)
    extra = ["It's 10:30 and 1,000 people; they're happy?", "A [bracketed] {curly} thing & co. 50% off $5",
             "\"Quoted\" words and 'single quotes' here", "The cats' bowls aren't full!!", "cannot",
             "A dog\u2019s \u201ctoy\u201d \u2013 a man\u2026walking"]
    caps = {f"{i}-{k}": [{"caption": c}] for i, refs in ann.references.items() for k, c in enumerate(refs)}
    caps.update({f"x{k}": [{"caption": c}] for k, c in enumerate(extra)})
    official = PTBTokenizer().tokenize(caps)
    assert {k: " ".join(tokenize(v[0]["caption"])) for k, v in caps.items()} == {
        k: v[0] for k, v in official.items()}


# ------------------------------------------------------------------------------------- VQA accuracy


def test_question_accuracy_leave_one_out_by_hand():
    # k of 10 humans match. Leaving out one of the k leaves k-1 matches (k subsets), leaving out
    # another human leaves k (10-k subsets): acc = (k*min(1,(k-1)/3) + (10-k)*min(1,k/3)) / 10
    # k=1: 9*(1/3)/10 = 0.3; k=2: (2/3 + 8*2/3)/10 = 0.6; k=3: (3*2/3 + 7)/10 = 0.9; k>=4: 1
    expected = [0.0, 0.3, 0.6, 0.9] + [1.0] * 7
    for k, acc in enumerate(expected):
        assert question_accuracy("red", ["red"] * k + ["blue"] * (10 - k)) == pytest.approx(acc)


def test_answer_normalisation():
    assert normalize_answer("Two") == "2"
    assert normalize_answer("a dog.") == "dog"
    assert normalize_answer("dont") == "don't"
    assert normalize_answer("yes!") == "yes"
    assert normalize_answer("  The  Red, car\n") == "red car"
    assert normalize_answer("3.5") == "3.5" and normalize_answer("1,000 dogs") == "1000 dogs"
    assert process_punctuation("black/white") == "black white"  # a mark between words separates them
    assert question_accuracy("Two", ["2"] * 4 + ["3"] * 6) == 1.0


def test_vqa_fixture_files_overall_and_per_answer_type():
    questions = load_vqa_questions(FIXTURES / "vqa_questions.json")
    annotations = load_vqa_annotations(FIXTURES / "vqa_annotations.json")
    results = load_vqa_results(FIXTURES / "vqa_results.json")
    assert [q.question_id for q in questions] == [11, 12, 21, 22, 31, 32]
    assert annotations[12].answer_type == "number" and len(annotations[12].answers) == 10
    m = score_vqa_results(results, annotations, questions)
    # 11 "Red." vs 10x red: 1; 12 "Two" vs 2x "2": 0.6; 21 "yes!" vs 9x yes: 1;
    # 22 "a square" vs 2x square: 0.6; 31 "yes" vs 10x no: 0; 32 "green" vs 3x green: 0.9
    assert m["per_question"] == pytest.approx({11: 1.0, 12: 0.6, 21: 1.0, 22: 0.6, 31: 0.0, 32: 0.9})
    assert m["accuracy"] == pytest.approx(4.1 / 6)
    assert m["per_answer_type"] == pytest.approx({"number": 0.6, "other": 2.5 / 3, "yes/no": 0.5})
    assert m["per_question_type"]["what color is the"] == pytest.approx(0.95)


def test_vqa_bad_results_are_clear_errors(tmp_path):
    annotations = load_vqa_annotations(FIXTURES / "vqa_annotations.json")
    bad = load_vqa_results(FIXTURES / "vqa_results_unknown_question.json")
    with pytest.raises(ValueError, match=r"1 answered question id\(s\) are not in the annotations.*999"):
        vqa_accuracy(bad, annotations)
    with pytest.raises(ValueError, match="have no answer"):
        vqa_accuracy({11: "red"}, annotations)
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps([{"question_id": 1, "answer": "a"}, {"question_id": 1, "answer": "b"}]))
    with pytest.raises(ValueError, match="a second answer"):
        load_vqa_results(twice)


# ---------------------------------------------------------------------------- tasks, end to end


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, one_thread):
    from chameleon_lm.checkpoints import save_model
    from chameleon_lm.documents import DocumentCodec
    from chameleon_lm.tokenizers.image import load_image_tokenizer
    from chameleon_lm.tokenizers.text import load_text_tokenizer

    ann = load_coco_captions(CAPTIONS)
    corpus = [c for refs in ann.references.values() for c in refs]
    corpus += [q.question for q in load_vqa_questions(FIXTURES / "vqa_questions.json")]
    folder = write_tiny_tokenizers(tmp_path_factory.mktemp("model"), corpus * 20)
    codec = DocumentCodec(load_text_tokenizer(folder / "tokenizer.json"), load_image_tokenizer(folder))
    return save_model(folder, tiny_model(codec), codec.text, codec.image)


def test_chameleon_eval_caption_on_a_tiny_model(model_dir, tmp_path, capsys):
    from chameleon_lm.checkpoints import load_model
    from chameleon_lm.documents import DocumentCodec
    from chameleon_lm.eval.tasks.captioning import benchmark_generation_config, caption_images
    from chameleon_lm.tokenizers.images import open_image

    out = tmp_path / "caption"
    assert main(["eval", "caption", "--model", str(model_dir), "--annotations", str(CAPTIONS),
                  "--images", str(IMAGES), "--out", str(out), "--seed", "3", "--limit", "2",
                  "--max-new-tokens", "6"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    results = load_coco_results(out / "captions_results.json")
    assert list(results) == [1, 2] and all(isinstance(c, str) for c in results.values())
    assert math.isfinite(metrics["score"]) and metrics["score"] >= 0 and metrics["seed"] == 3
    assert metrics["settings"]["generation"]["text"]["greedy"] is True
    refs = load_coco_captions(CAPTIONS).references
    assert metrics["score"] == cider_d(results, refs)["score"]
    # greedy with a pinned seed: the task function gives the same captions
    loaded = load_model(model_dir)
    codec = DocumentCodec(loaded.text_tokenizer, loaded.image_tokenizer)
    images = [open_image(IMAGES / f"COCO_val2014_{i:012d}.png") for i in (1, 2)]
    again = caption_images(loaded.model, codec, images, "A short caption of the image:",
                           benchmark_generation_config(3, 6))
    assert again == list(results.values())
    # scoring the written results file needs no model
    assert main(["eval", "caption", "--results", str(out / "captions_results.json"),
                  "--annotations", str(CAPTIONS), "--out", str(tmp_path / "rescored")]) == 0
    assert json.loads((tmp_path / "rescored" / "metrics.json").read_text())["score"] == metrics["score"]
    assert main(["eval", "caption", "--results", str(FIXTURES / "captions_results.json"),
                  "--annotations", str(CAPTIONS)]) == 0
    assert "CIDEr-D 2.8388 over 3 images" in capsys.readouterr().out


def test_chameleon_eval_vqa_on_a_tiny_model(model_dir, tmp_path, capsys):
    out = tmp_path / "vqa"
    args = ["eval", "vqa", "--questions", str(FIXTURES / "vqa_questions.json"),
            "--annotations", str(FIXTURES / "vqa_annotations.json")]
    assert main([*args, "--model", str(model_dir), "--images", str(IMAGES), "--out", str(out),
                  "--limit", "3", "--max-new-tokens", "4"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    answers = load_vqa_results(out / "vqa_results.json")
    assert list(answers) == [11, 12, 21] and metrics["n_questions"] == 3
    assert 0 <= metrics["score"] <= 1
    annotations = load_vqa_annotations(FIXTURES / "vqa_annotations.json")
    assert metrics["score"] == vqa_accuracy(answers, {q: annotations[q] for q in answers})["accuracy"]
    # a results file with an unknown question fails with a clear message
    assert main([*args, "--results", str(FIXTURES / "vqa_results_unknown_question.json")]) == 2
    assert "not in the annotations" in capsys.readouterr().err
    assert main([*args, "--results", str(FIXTURES / "vqa_results.json")]) == 0
    assert "VQA accuracy 0.6833 over 6 questions" in capsys.readouterr().out
