"""VQA accuracy as the official evaluation computes it, plus exact-match and top-k accuracy.

:func:`vqa_accuracy` reproduces ``vqaEval.py`` of the official VQA API (github.com/GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` at commit 458a8b2, October 2016, the script of the VQA v1
and v2 results) step by step, quirks included, because published numbers come from that script:

- the predicted answer: ``\\n``/``\\t`` -> space, strip, :func:`process_punctuation`, then
  :func:`process_digit_article` (lower-case, number words -> digits, drop articles, add the apostrophe
  to contractions such as ``dont`` -> ``don't``);
- the ground-truth answers: :func:`process_punctuation` only, and only when they are not all identical
  (the annotations are already normalised; the script relies on that);
- accuracy: for each of the n human answers, ``min(1, #matches among the other n-1 answers / 3)``,
  averaged over the n leave-one-out subsets (n = 10 in VQA v1/v2).

A 2021 commit of that repository (a013f00, "Fixed processing answers bug") changed the rule: there, the
ground truths *and* the prediction get both steps when the annotators disagree, and neither gets any
processing when they all agree ("two" vs ``["2"] * 10`` scores 0 there). Numbers computed with that
version differ from these on such questions.

Quirks kept from the script: its period regex ``(?!<=\\d)(\\.)(?!\\d)`` is a look-*ahead*, so it removes
every period not followed by a digit; it is applied with ``count=re.UNICODE`` (= 32), so only the first
32 periods go; a punctuation mark is deleted (not replaced by a space) when it touches a space anywhere
in the answer or when the answer contains a comma between digits.

Example:
    >>> vqa_accuracy("Two", ["2"] * 4 + ["3"] * 6)
    1.0
    >>> round(vqa_accuracy("2", ["2"] * 2 + ["3"] * 8), 4)
    0.6
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from vlpeft_jax.errors import InputError

# Copied from the official vqaEval.py (commit 458a8b2, which fixed its apostrophes; keys like "Im" can never
# match after lower-casing, as in the original).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: a look-ahead, see the module docstring
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: delete or space out punctuation, strip periods.

    Example:
        >>> process_punctuation("yes, it is.")
        'yes it is'
        >>> process_punctuation("red/white")
        'red white'
    """
    out = text
    comma_between_digits = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or comma_between_digits:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=re.UNICODE)  # sic: the script passes re.UNICODE (32) as count


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words -> digits, drop articles, contractions.

    Example:
        >>> process_digit_article("The Two dogs dont")
        "2 dogs don't"
    """
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """How the official script normalises a predicted answer.

    Example:
        >>> normalize_answer("  An Apple.\\n")
        'apple'
    """
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy of one predicted answer against the human answers (usually 10), in [0, 1].

    Raises:
      InputError: if ``prediction`` is not a string or fewer than 2 answers are given (leave-one-out needs
        at least 2; use :func:`exact_match` for single-answer data).
    """
    if not isinstance(prediction, str):
        raise InputError(f"predicted answer must be a string, got {prediction!r}")
    if len(answers) < 2 or not all(isinstance(a, str) for a in answers):
        raise InputError(f"VQA accuracy needs >= 2 string answers per question, got {answers!r}")
    pred = normalize_answer(prediction)
    gts = [process_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    matches = sum(a == pred for a in gts)
    # Leaving out answer i: the others match (matches - [gt_i == pred]) times.
    acc = [min(1.0, (matches - (a == pred)) / 3) for a in gts]
    return float(sum(acc) / len(acc))


def vqa_accuracy_dataset(
    predictions: Mapping[Hashable, str], answers: Mapping[Hashable, Sequence[str]]
) -> tuple[float, dict[Hashable, float]]:
    """Mean official VQA accuracy over questions: ``(mean, {question_id: accuracy})``.

    Raises:
      InputError: naming question ids without ground-truth answers.

    Example:
        >>> vqa_accuracy_dataset({7: "yes"}, {7: ["yes"] * 10})
        (1.0, {7: 1.0})
    """
    missing = [q for q in predictions if q not in answers]
    if missing:
        shown = ", ".join(repr(q) for q in missing[:10])
        more = " ..." if len(missing) > 10 else ""
        raise InputError(f"predictions for question ids without answers: {shown}{more}")
    per_question = {q: vqa_accuracy(p, answers[q]) for q, p in predictions.items()}
    mean = float(np.mean(list(per_question.values()))) if per_question else float("nan")
    return mean, per_question


def exact_match(predictions: Sequence, targets: Sequence, normalize: bool = False) -> float:
    """Fraction of predictions equal to their target (class ids, or strings; optionally VQA-normalised).

    Example:
        >>> exact_match(["Two", "a cat"], ["2", "cat"], normalize=True)
        1.0
    """
    if len(predictions) != len(targets):
        raise InputError(f"{len(predictions)} predictions for {len(targets)} targets")
    if len(predictions) == 0:
        return float("nan")
    if normalize:
        predictions = [normalize_answer(p) for p in predictions]
        targets = [normalize_answer(t) for t in targets]
    return float(np.mean([p == t for p, t in zip(predictions, targets, strict=True)]))


def top_k_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of rows whose label is among the ``k`` highest logits (ties broken by lower index first).

    Args:
      logits: ``[n, num_classes]`` scores of a classification head.
      labels: ``[n]`` integer class ids.

    Example:
        >>> top_k_accuracy(np.array([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3]]), np.array([1, 2]), k=2)
        1.0
    """
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise InputError(
            f"top_k_accuracy needs logits [n, classes] and labels [n], got {logits.shape} and {labels.shape}"
        )
    if not 1 <= k <= logits.shape[1]:
        raise InputError(f"k={k} must be in [1, {logits.shape[1]}]")
    if len(labels) == 0:
        return float("nan")
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(order == labels[:, None], axis=1)))


def vqa_soft_score(logits: np.ndarray, target_scores: np.ndarray) -> float:
    """Mean soft score of the argmax class for classification VQA heads (targets ``min(1, count/3)``-style).

    This is the usual training-time proxy of VQA accuracy (e.g. bottom-up attention's ``compute_score``);
    report :func:`vqa_accuracy_dataset` on decoded answers for the official number.

    Example:
        >>> vqa_soft_score(np.array([[2.0, 1.0]]), np.array([[0.3, 1.0]]))
        0.3
    """
    logits, target_scores = np.asarray(logits), np.asarray(target_scores)
    if logits.shape != target_scores.shape or logits.ndim != 2:
        raise InputError(f"logits {logits.shape} and target_scores {target_scores.shape} must both be [n, classes]")
    picked = target_scores[np.arange(len(logits)), np.argmax(logits, axis=1)]
    return float(np.mean(picked)) if len(picked) else float("nan")
