"""VQA accuracy vs a reference written from the published description of the official evaluation.

The reference below follows https://visualqa.org/evaluation.html, not the official script's code:

    Acc(ans) = min(#humans that said ans / 3, 1), averaged over all 10-choose-9 subsets of the human
    answers. Before evaluating, answers are processed: making all characters lowercase; removing periods
    except if it occurs as decimal; converting number words to digits; removing articles (a, an, the);
    adding apostrophe if a contraction is missing it (e.g., "dont" -> "don't"); replacing all punctuation
    (except apostrophe and colon) with a space character; a comma between digits is removed
    (e.g. "100,978" -> "100978").

Where the official script departs from that description (which punctuation characters it handles,
"none" -> "0", ground truths processed only when annotators disagree) is tested separately against
hand-derived expectations, so the parity cases stay inside the described behaviour.
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from vlpeft_jax.errors import InputError
from vlpeft_jax.eval import vqa

_DESCRIBED_NUMBERS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                      "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_DESCRIBED_CONTRACTIONS = {"dont": "don't", "cant": "can't", "isnt": "isn't", "wont": "won't", "whats": "what's",
                           "thats": "that's", "doesnt": "doesn't", "arent": "aren't", "im": "i'm"}
# Punctuation the test set uses (a subset of the script's list, see module docstring).
_DESCRIBED_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"


def reference_normalize(answer: str) -> str:
    text = answer.strip().lower()
    text = re.sub(r"(?<=\d),(?=\d)", "", text)  # comma between digits: removed
    text = re.sub(r"\.(?!\d)", "", text)  # periods except decimals
    text = "".join(" " if ch in _DESCRIBED_PUNCTUATION else ch for ch in text)
    words = [_DESCRIBED_NUMBERS.get(w, w) for w in text.split()]
    words = [_DESCRIBED_CONTRACTIONS.get(w, w) for w in words if w not in ("a", "an", "the")]
    return " ".join(words)


def reference_accuracy(prediction: str, answers: list[str]) -> float:
    pred = reference_normalize(prediction)
    gts = [reference_normalize(a) for a in answers]
    subsets = list(itertools.combinations(range(len(gts)), len(gts) - 1))
    return float(np.mean([min(sum(gts[i] == pred for i in s) / 3, 1.0) for s in subsets]))


TEN = 10
CASES = [
    # (prediction, human answers) -- each normalisation rule and each count of matching humans.
    ("yes", ["yes"] * TEN),  # all agree
    ("Yes", ["yes"] * 7 + ["no"] * 3),  # lower-casing
    ("no", ["yes"] * 7 + ["no"] * 3),  # 3 matches
    ("no", ["yes"] * 8 + ["no"] * 2),  # 2 matches
    ("no", ["yes"] * 9 + ["no"]),  # 1 match
    ("maybe", ["yes"] * 9 + ["no"]),  # 0 matches
    ("blue", ["blue"] * 4 + ["navy"] * 6),  # 4 matches (subsets with 3 and 4)
    ("yes.", ["yes"] * 5 + ["no"] * 5),  # trailing period removed
    ("2.5", ["2.5"] * 3 + ["2"] * 7),  # decimal point kept
    ("Two", ["2"] * 6 + ["3"] * 4),  # number word -> digit
    ("ten", ["10"] * 3 + ["11"] * 7),
    ("zero", ["0"] * 4 + ["1"] * 6),
    ("a dog", ["dog"] * 5 + ["cat"] * 5),  # articles removed
    ("The Man", ["man"] * 3 + ["woman"] * 7),
    ("an apple", ["apple"] * 10),
    ("dont know", ["don't know"] * 4 + ["no"] * 6),  # contraction gets its apostrophe
    ("whats that", ["what's that"] * 3 + ["no"] * 7),
    ("t-shirt", ["t shirt"] * 5 + ["shirt"] * 5),  # punctuation -> space
    ("red/white", ["red white"] * 3 + ["red"] * 7),
    ("(left)", ["left"] * 6 + ["right"] * 4),
    ("yes!", ["yes"] * 6 + ["no"] * 4),
    ("what?", ["what"] * 3 + ["no"] * 7),
    ("1,000", ["1000"] * 4 + ["100"] * 6),  # comma between digits removed
    ("10:30", ["10:30"] * 5 + ["10"] * 5),  # colon kept
    ("it's red", ["it's red"] * 3 + ["red"] * 7),  # apostrophe kept
    ("  yes\n", ["yes"] * 4 + ["no"] * 6),  # surrounding whitespace, newline
    ("yes\tsir", ["yes sir"] * 3 + ["no"] * 7),  # tab
    ("T-Shirt", ["t-shirt"] * 4 + ["shirt"] * 6),  # ground truth with punctuation, annotators disagree
    ("2 dogs", ["2 dogs", "3 dogs", "2", "dogs", "2 dogs", "2 dogs", "3 dogs", "2 dogs", "dogs", "2"]),
]


@pytest.mark.parametrize("prediction,answers", CASES)
def test_vqa_accuracy_matches_described_algorithm(prediction, answers):
    assert vqa.vqa_accuracy(prediction, answers) == pytest.approx(reference_accuracy(prediction, answers), abs=1e-12)


def test_leave_one_out_values():
    # min(1, k/3) averaged over the 10 leave-one-out subsets: 3 matches -> (7*1 + 3*2/3) / 10 = 0.9.
    assert vqa.vqa_accuracy("no", ["yes"] * 7 + ["no"] * 3) == pytest.approx(0.9)
    assert vqa.vqa_accuracy("no", ["yes"] * 9 + ["no"]) == pytest.approx(0.3)
    assert vqa.vqa_accuracy("x", ["x"] * 4 + ["y"] * 6) == pytest.approx(1.0)


def test_script_quirks_beyond_the_description():
    # 'none' counts as a number word in the script.
    assert vqa.normalize_answer("none") == "0"
    # Characters outside the script's punctuation list stay ('%', '$', '#', '&', '*').
    assert vqa.normalize_answer("50%") == "50%"
    assert vqa.normalize_answer("$5 & #1") == "$5 & #1"
    # A punctuation mark next to a space is deleted, not replaced by a space.
    assert vqa.process_punctuation("red / white") == "red  white"
    assert vqa.process_punctuation("red/white") == "red white"
    # With a comma between digits anywhere, every punctuation mark is deleted.
    assert vqa.process_punctuation("1,000 red/white") == "1000 redwhite"
    # Only the first 32 periods are stripped (the script passes re.UNICODE = 32 as the count).
    assert vqa.process_punctuation("." * 40) == "." * 8
    # Identical ground truths are compared unprocessed; differing ones get punctuation processing only.
    assert vqa.vqa_accuracy("t shirt", ["t-shirt"] * 10) == 0.0
    assert vqa.vqa_accuracy("t shirt", ["t-shirt"] * 9 + ["shirt"]) == pytest.approx(1.0)


def test_dataset_accuracy_and_errors():
    preds = {1: "yes", 2: "two", 3: "blue"}
    answers = {1: ["yes"] * 10, 2: ["2"] * 2 + ["3"] * 8, 3: ["red"] * 10}
    mean, per = vqa.vqa_accuracy_dataset(preds, answers)
    assert per == {1: 1.0, 2: pytest.approx(0.6), 3: 0.0}
    assert mean == pytest.approx(1.6 / 3)
    with pytest.raises(InputError, match=r"question ids without answers: 9"):
        vqa.vqa_accuracy_dataset({9: "yes"}, answers)
    with pytest.raises(InputError, match=">= 2"):
        vqa.vqa_accuracy("yes", ["yes"])
    with pytest.raises(InputError, match="string"):
        vqa.vqa_accuracy(3, ["3"] * 10)


def test_exact_match_and_top_k():
    assert vqa.exact_match([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert vqa.exact_match(["Two", "A dog."], ["2", "dog"], normalize=True) == 1.0
    assert vqa.exact_match(["Two"], ["2"]) == 0.0
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(200, 30)), rng.integers(0, 30, size=200)
    for k in (1, 5, 30):
        # label in the top k <=> fewer than k logits exceed the label's logit (no ties with random floats)
        want = np.mean((logits > logits[np.arange(200), labels][:, None]).sum(1) < k)
        assert vqa.top_k_accuracy(logits, labels, k) == pytest.approx(want)
    assert vqa.top_k_accuracy(logits, labels, 30) == 1.0
    with pytest.raises(InputError, match="k=31"):
        vqa.top_k_accuracy(logits, labels, 31)
    soft = np.zeros((2, 3))
    soft[0, 1], soft[1, 2] = 1.0, 0.3
    assert vqa.vqa_soft_score(np.array([[0, 5, 1], [0, 1, 9]]), soft) == pytest.approx(0.65)
