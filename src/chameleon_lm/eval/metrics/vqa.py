"""VQAv2 accuracy as the official ``vqaEval.py`` computes it, and VQAv2 file loaders.

Per question, the model's answer is normalised (:func:`normalize_answer`: punctuation, number words
to digits, articles dropped, apostrophe-less contractions restored) and compared with the ten human
answers; the accuracy is the mean over the ten leave-one-out subsets of nine humans of
``min(1, #humans in the subset who gave that answer / 3)``. As in the official script the human answers
are taken as stored (VQAv2's are already normalised) except that their punctuation is processed when
the humans disagree.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chameleon_lm.eval.metrics import load_results, write_results
from chameleon_lm.utils.weights import read_json

QuestionId = int | str

_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
          ",", "?", "!")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# the official lookbehind is misspelt ``(?!<=\d)``, a lookahead that always holds: a period goes
# unless a digit follows it
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's",
    "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "shant": "shan't", "shed": "she'd",
    "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "somebodys": "somebody's",
    "someones": "someone's", "somethings": "something's", "thats": "that's", "thered": "there'd",
    "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
"""The common entries of the official contraction map (apostrophe-less form → form with apostrophe)."""


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: drop or space out punctuation, drop periods."""
    out = text
    for p in _PUNCT:
        # a mark next to a space (or any text with a 1,000-style number) is dropped, else a separator
        if p + " " in text or " " + p in text or _COMMA_IN_NUMBER.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # the official call passes re.UNICODE (32) where ``sub`` takes its count
    return _PERIOD.sub("", out, count=re.UNICODE)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lowercase, number words → digits, no articles,
    contractions restored."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """A model's answer as the official evaluation compares it."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def question_accuracy(answer: str, human_answers: Sequence[str]) -> float:
    """Mean over leave-one-out subsets of ``min(1, matching humans / 3)`` (``answer`` unnormalised)."""
    if not human_answers:
        raise ValueError("a question needs human answers")
    res = normalize_answer(answer)
    humans = [a.replace("\n", " ").replace("\t", " ").strip() for a in human_answers]
    if len(set(humans)) > 1:
        humans = [process_punctuation(a) for a in humans]
    matches = sum(a == res for a in humans)
    # leaving out a matching human leaves matches - 1, any other leaves matches
    accs = [min(1.0, (matches - (a == res)) / 3) for a in humans]
    return sum(accs) / len(accs)


@dataclass
class VQAQuestion:
    question_id: QuestionId
    image_id: int | str
    question: str


@dataclass
class VQAAnnotation:
    question_id: QuestionId
    image_id: int | str
    answers: list[str]
    """The human answers (ten in VQAv2)."""
    answer_type: str = ""
    question_type: str = ""


def vqa_accuracy(answers: Mapping[QuestionId, str], annotations: Mapping[QuestionId, VQAAnnotation]
                 ) -> dict[str, Any]:
    """Accuracy of the answers to every annotated question, overall and per answer/question type.

    Like the official evaluation, the answers must cover exactly the annotated questions (pass the
    annotations of the questions asked).

    Returns:
        ``accuracy`` (0–1; the official script prints it ×100 rounded to 2 decimals),
        ``per_answer_type``, ``per_question_type`` (where the annotations name them), ``per_question``
        and ``n_questions``.
    """
    unknown = [q for q in answers if q not in annotations]
    if unknown:
        raise ValueError(f"{len(unknown)} answered question id(s) are not in the annotations, e.g. "
                         f"{unknown[:5]}")
    missing = [q for q in annotations if q not in answers]
    if missing:
        raise ValueError(f"{len(missing)} annotated question(s) have no answer, e.g. {missing[:5]}")
    if not annotations:
        raise ValueError("no questions to score")
    per_question = {q: question_accuracy(answers[q], ann.answers) for q, ann in annotations.items()}
    by_answer: dict[str, list[float]] = {}
    by_question: dict[str, list[float]] = {}
    for q, ann in annotations.items():
        if ann.answer_type:
            by_answer.setdefault(ann.answer_type, []).append(per_question[q])
        if ann.question_type:
            by_question.setdefault(ann.question_type, []).append(per_question[q])
    return {
        "accuracy": sum(per_question.values()) / len(per_question),
        "per_answer_type": {t: sum(v) / len(v) for t, v in sorted(by_answer.items())},
        "per_question_type": {t: sum(v) / len(v) for t, v in sorted(by_question.items())},
        "per_question": per_question,
        "n_questions": len(per_question),
    }


# ------------------------------------------------------------------------------------ VQAv2 files


def _fail(path: str | os.PathLike, what: str) -> ValueError:
    return ValueError(f"{path}: {what}")


def load_vqa_questions(path: str | os.PathLike) -> list[VQAQuestion]:
    """Read ``{"questions": [{"question_id", "image_id", "question"}]}``, in file order."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise _fail(path, "not a VQA questions file (expected an object with a 'questions' list)")
    out, seen = [], set()
    for k, q in enumerate(data["questions"]):
        if not isinstance(q, dict) or not {"question_id", "image_id"} <= q.keys() \
                or not isinstance(q.get("question"), str):
            raise _fail(path, f"questions[{k}] needs 'question_id', 'image_id' and a string 'question'")
        if q["question_id"] in seen:
            raise _fail(path, f"questions[{k}]: question id {q['question_id']!r} appears twice")
        seen.add(q["question_id"])
        out.append(VQAQuestion(q["question_id"], q["image_id"], q["question"]))
    if not out:
        raise _fail(path, "no questions")
    return out


def load_vqa_annotations(path: str | os.PathLike) -> dict[QuestionId, VQAAnnotation]:
    """Read ``{"annotations": [{"question_id", "image_id", "answer_type", "answers": [{"answer"}]}]}``."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise _fail(path, "not a VQA annotations file (expected an object with an 'annotations' list)")
    out: dict[QuestionId, VQAAnnotation] = {}
    for k, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or not {"question_id", "image_id"} <= a.keys():
            raise _fail(path, f"annotations[{k}] needs 'question_id' and 'image_id'")
        answers = a.get("answers")
        if not isinstance(answers, list) or not answers or not all(
                isinstance(x, dict) and isinstance(x.get("answer"), str) for x in answers):
            raise _fail(path, f"annotations[{k}]: 'answers' must be a non-empty list of {{'answer': str}}")
        if a["question_id"] in out:
            raise _fail(path, f"annotations[{k}]: question id {a['question_id']!r} appears twice")
        out[a["question_id"]] = VQAAnnotation(a["question_id"], a["image_id"],
                                              [x["answer"] for x in answers],
                                              str(a.get("answer_type", "")),
                                              str(a.get("question_type", "")))
    if not out:
        raise _fail(path, "no annotations")
    return out


def load_vqa_results(path: str | os.PathLike) -> dict[QuestionId, str]:
    """Read a results file ``[{"question_id", "answer"}]`` (one answer per id)."""
    return load_results(path, "question_id", "answer")


def write_vqa_results(path: str | os.PathLike, answers: Mapping[QuestionId, str]) -> Path:
    """Write ``[{"question_id", "answer"}]`` (the format :func:`load_vqa_results` and the official tools read)."""
    return write_results(path, answers, "question_id", "answer")


def score_vqa_results(results: Mapping[QuestionId, str],
                      annotations: Mapping[QuestionId, VQAAnnotation],
                      questions: Sequence[VQAQuestion] | None = None) -> dict[str, Any]:
    """:func:`vqa_accuracy` over ``questions`` (default: every annotated question)."""
    if questions is not None:
        absent = [q.question_id for q in questions if q.question_id not in annotations]
        if absent:
            raise ValueError(f"{len(absent)} question(s) have no annotation, e.g. {absent[:5]}")
        annotations = {q.question_id: annotations[q.question_id] for q in questions}
    return vqa_accuracy(results, annotations)
