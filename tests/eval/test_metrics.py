"""Caption metrics vs pycocoevalcap (BLEU, ROUGE-L, CIDEr-D to 1e-6), METEOR via the jar, tokenisation,
SPICE availability, the ``score`` command line, bad input, CLIP-Score and r_TCM."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from vlpeft_jax.benchmarks import metrics as bench_metrics
from vlpeft_jax.errors import InputError
from vlpeft_jax.eval import captions, clipscore, rtcm, tokenize

pycocoevalcap = pytest.importorskip("pycocoevalcap")
from pycocoevalcap.bleu.bleu import Bleu  # noqa: E402
from pycocoevalcap.cider.cider import Cider  # noqa: E402
from pycocoevalcap.rouge.rouge import Rouge  # noqa: E402

HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="needs Java ('java' on PATH) for pycocoevalcap's jars")
TOL = 1e-6

LONG_A = " ".join(f"w{(7 * i) % 23}" for i in range(90))  # > 64 tokens: quadratic LCS path
LONG_B = " ".join(f"w{(5 * i) % 19}" for i in range(80))


def edge_case_set() -> tuple[dict, dict]:
    """Hand-written tokenised captions covering the edge cases the issue lists (and a few more)."""
    refs = {
        "stop_words_only": ["a man riding a horse on the beach", "the brown horse is on a beach"],
        "repeated_ngrams": ["a dog a dog running on the grass", "a dog runs on the grass"],
        "very_short": ["a cat sitting on a red sofa", "cat on the sofa", "a sleepy cat"],
        "longer_than_refs": ["a red bus", "a bus on a street"],
        "identical": ["two people playing frisbee in a park"],
        "no_overlap": ["a plate of food", "food on a plate", "a sandwich and fries"],
        "one_ref": ["a giraffe standing next to a tree"],
        "seven_refs": [f"a boat on the water number {k}" for k in range(7)],
        "long_pairs": [LONG_A, LONG_B, "w1 w2 w3"],
        "width_32": [" ".join(f"x{i % 9}" for i in range(30)), "x1 x2"],
        "width_64": [" ".join(f"y{i % 11}" for i in range(50)), "y3 y4 y5"],
        "empty_tokenised_ref": ["", "a kite in the sky"],
        "tie_closest_ref_len": ["a b c d", "a b c d e f"],
        0: ["an elephant walking", "elephants walking in a line"],
        17: ["a man holding an umbrella", "man with umbrella in the rain"],
    }
    cands = {
        "stop_words_only": "the a on of is",
        "repeated_ngrams": "a dog a dog a dog a dog",
        "very_short": "cat",
        "longer_than_refs": "a big red bus driving down a long street in the middle of a busy city at night",
        "identical": "two people playing frisbee in a park",
        "no_overlap": "zebra zebra giraffe",
        "one_ref": "a giraffe next to a tree",
        "seven_refs": "a boat on the water",
        "long_pairs": " ".join(f"w{(3 * i) % 17}" for i in range(100)),
        "width_32": " ".join(f"x{(2 * i) % 9}" for i in range(25)),
        "width_64": " ".join(f"y{(3 * i) % 11}" for i in range(45)),
        "empty_tokenised_ref": "a kite flying",
        "tie_closest_ref_len": "a b c d e",
        0: "an elephant walking in a line",
        17: "",  # a caption that tokenisation emptied (e.g. "...")
    }
    return refs, cands


def coco_scores(refs: dict, cands: dict) -> dict[str, tuple]:
    """pycocoevalcap's Bleu(4), Rouge, Cider on the same tokenised captions."""
    gts = {i: list(r) for i, r in refs.items()}
    res = {i: [c] for i, c in cands.items()}
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    return {
        "bleu": (np.asarray(bleu), np.asarray(bleu_each).T),
        "rouge": Rouge().compute_score(gts, res),
        "cider": Cider().compute_score(gts, res),
    }


def max_diffs(refs: dict, cands: dict) -> dict[str, float]:
    ref = coco_scores(refs, cands)
    ours = {
        "bleu": captions.bleu(refs, cands),
        "rouge": captions.rouge_l(refs, cands),
        "cider": captions.cider_d(refs, cands),
    }
    out = {}
    for name in ours:
        (rc, re_), (oc, oe) = ref[name], ours[name]
        assert np.shape(oe)[0] == len(cands)
        out[f"{name}_corpus"] = float(np.max(np.abs(np.asarray(rc) - np.asarray(oc))))
        out[f"{name}_per_image"] = float(np.max(np.abs(np.asarray(re_) - np.asarray(oe))))
    return out


# ------------------------------------------------------------------------------------------------------
# Parity with pycocoevalcap


def test_edge_cases_match_pycocoevalcap():
    refs, cands = edge_case_set()
    diffs = max_diffs(refs, cands)
    assert max(diffs.values()) <= TOL, diffs
    # The edge cases really are edge cases: they exercise clipping, brevity penalty and zero scores.
    bleu_corpus, bleu_each = captions.bleu(refs, cands)
    ids = list(cands)
    assert bleu_each[ids.index("repeated_ngrams"), 0] < 1.0  # clipped unigram counts
    assert bleu_each[ids.index("very_short"), 0] < 0.2  # brevity penalty exp(1 - 3/1)
    assert captions.cider_d(refs, cands)[1][ids.index("no_overlap")] == 0.0


def test_all_references_empty_after_tokenisation():
    refs, cands = {1: ["", ""], 2: [""]}, {1: "a b", 2: "c"}
    gts, res = {i: list(r) for i, r in refs.items()}, {i: [c] for i, c in cands.items()}
    bleu_corpus, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    np.testing.assert_allclose(captions.bleu(refs, cands)[0], bleu_corpus, atol=TOL)
    np.testing.assert_allclose(captions.bleu(refs, cands)[1], np.asarray(bleu_each).T, atol=TOL)
    np.testing.assert_allclose(captions.rouge_l(refs, cands)[1], Rouge().compute_score(gts, res)[1], atol=TOL)
    # pycocoevalcap's Cider fails here (max() of an empty document-frequency table); nothing can match.
    assert captions.cider_d(refs, cands)[1].tolist() == [0.0, 0.0]


def test_synthetic_1000_images_match_pycocoevalcap():
    refs, cands = bench_metrics.synthetic_captions(1000, 5, seed=1234)
    diffs = max_diffs(refs, cands)
    assert max(diffs.values()) <= TOL, diffs


def test_accepts_pycocoevalcap_res_format_and_table_reuse():
    refs, cands = edge_case_set()
    as_lists = {i: [c] for i, c in cands.items()}
    table = captions.ngram_table(refs, cands, 4)
    np.testing.assert_allclose(captions.bleu(refs, as_lists)[1], captions.bleu(refs, cands, table=table)[1])
    assert captions.cider_d(refs, as_lists)[0] == pytest.approx(captions.cider_d(refs, cands, table=table)[0])


def _paper_cider(refs: dict, cands: dict, n: int = 4) -> tuple[float, list[float]]:
    """Plain CIDEr from Vedantam et al. 2015, Eq. 2-4 (tf normalised by sentence length, idf over the
    references of all images with document frequencies floored at 1 as in the authors' code), times 10 as
    the authors' pyciderevalcap ``Cider``."""

    def grams(sentence: str, k: int) -> Counter:
        w = sentence.split()
        return Counter(tuple(w[i : i + k]) for i in range(len(w) - k + 1))

    num_images = len(refs)
    per_image = []
    for image, cand in cands.items():
        total = 0.0
        for k in range(1, n + 1):
            df = Counter(g for rs in refs.values() for g in set().union(*(grams(r, k) for r in rs)))

            def vec(sentence: str, k: int = k, df: Counter = df) -> dict:
                counts = grams(sentence, k)
                size = sum(counts.values())
                return {g: c / size * math.log(num_images / max(1.0, df[g])) for g, c in counts.items()}

            gc = vec(cand)
            sims = []
            for r in refs[image]:
                gr = vec(r)
                nc, nr = math.sqrt(sum(v * v for v in gc.values())), math.sqrt(sum(v * v for v in gr.values()))
                dot = sum(v * gr.get(g, 0.0) for g, v in gc.items())
                sims.append(dot / (nc * nr) if nc and nr else 0.0)
            total += sum(sims) / len(sims) / n
        per_image.append(10.0 * total)
    return float(np.mean(per_image)), per_image


def test_plain_cider_matches_paper_definition():
    refs, cands = bench_metrics.synthetic_captions(40, 5, seed=7)
    refs_e, cands_e = edge_case_set()
    for r, c in ((refs, cands), (refs_e, cands_e)):
        corpus, each = _paper_cider(r, c)
        ours_corpus, ours_each = captions.cider(r, c)
        np.testing.assert_allclose(ours_each, each, atol=TOL)
        assert abs(ours_corpus - corpus) <= TOL
    # CIDEr-D differs from plain CIDEr exactly through clipping and the length penalty.
    assert not np.allclose(captions.cider_d(refs, cands)[1], captions.cider(refs, cands)[1])


def _lcs_reference(a: list, b: list) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_lcs_bit_parallel_matches_dynamic_programme():
    rng = np.random.default_rng(0)
    lengths = np.array([1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 70, 5, 40, 8])
    sentences = [rng.integers(0, 6, size=n) for n in lengths]
    tokens = np.concatenate(sentences)
    pairs = np.array(list(itertools.product(range(len(lengths)), repeat=2)))
    got = captions.lcs_lengths(tokens, lengths, pairs[:, 0], pairs[:, 1])
    want = [_lcs_reference(sentences[a].tolist(), sentences[b].tolist()) for a, b in pairs]
    assert got.tolist() == want


# ------------------------------------------------------------------------------------------------------
# Tokenisation

# Captions on which the pure-Python tokenizer gives the Java PTBTokenizer's output exactly.
TOKENIZER_AGREES = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs' toys, and a cat's bowl!",
    "He doesn't like it; they can't go (really) -- ok?",
    '"Quoted text" and \'single quotes\' here...',
    "A black-and-white photo of Mr. Smith in the U.S. in 1,000 B.C.",
    "It costs $3.50 & 5% more: yes/no {curly} [square]",
    "I'm gonna wanna CANNOT won't isn't",
    "Email me at bob@example.com or http://x.com/a",
    "The end .  Spaces   here\ttab",
    "e.g. etc. a.m. p.m.",
    "don't DON'T Don\u2019t \u201csmart quotes\u201d \u2018single\u2019 na\u00efve caf\u00e9",
    "10-year-old 3x3 1/2 #hash *star* ~tilde ^caret =eq +plus |pipe",
    "@user hi! AT&T R&B at 10:30, ratio 3:2.",
    "A STOP sign. A bus stop; at St. Mary's church",
    "people's dogs, the kids' toys and James' car",
    "a  surfer  ,rides a wave.Then falls",
    "It's 5 o'clock, they're here, we've won, I'll go, he'd stay",
    "A group of people standing around a table with food on it .",
    "an elephant... walking?! yes!!",
    "a 1950's car, a 1.5-liter bottle and .5 oz",
    "Line\nbreak and carriage\rreturn",
    "",
]
# Inputs where they differ, with PTBTokenizer's output (after pycocoevalcap's punctuation filter).
TOKENIZER_DIFFERS = {
    "<angle> brackets as 3<4": "<angle> brackets as 3 < 4",  # PTB: SGML tags, '<' between digits
    "y'all": "y' all",  # PTB splits this contraction differently
    "a 2.5m pole": "a 2.5 m pole",  # PTB splits units off numbers
    "_under_score": "_ under_score",  # PTB splits a leading underscore
}


@needs_java
def test_java_tokenizer_matches_pycocoevalcap():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # pycocoevalcap replaces only "\n": a "\r" would shift its output lines, so that input is left out here.
    texts = [c for c in TOKENIZER_AGREES if "\r" not in c] + list(TOKENIZER_DIFFERS)
    caps = {i: [c] for i, c in enumerate(texts)}
    want = PTBTokenizer().tokenize({i: [{"caption": c[0]}] for i, c in caps.items()})
    assert tokenize.ptb_tokenize(caps, backend="java") == want


@needs_java
def test_python_tokenizer_agrees_with_ptb():
    caps = {i: [c] for i, c in enumerate(TOKENIZER_AGREES)}
    java = tokenize.ptb_tokenize(caps, backend="java")
    python = tokenize.ptb_tokenize(caps, backend="python")
    mismatches = {TOKENIZER_AGREES[i]: (java[i], python[i]) for i in caps if java[i] != python[i]}
    assert not mismatches


@needs_java
def test_python_tokenizer_known_differences():
    caps = {i: [c] for i, c in enumerate(TOKENIZER_DIFFERS)}
    java = tokenize.ptb_tokenize(caps, backend="java")
    for i, (text, ptb_output) in enumerate(TOKENIZER_DIFFERS.items()):
        assert java[i] == [ptb_output], text
        assert tokenize.python_ptb_tokenize(text) != ptb_output, text


def test_python_tokenizer_rules_without_java():
    assert tokenize.python_ptb_tokenize("A Dog's toy (red), isn't it?") == "a dog 's toy -lrb- red -rrb- is n't it"
    want = "mr. smith paid $ 1,000.50 in the u.s."
    assert tokenize.python_ptb_tokenize("Mr. Smith paid $1,000.50 in the U.S.") == want
    assert tokenize.python_ptb_tokenize("cannot -- 'quoted' \"text\"...") == "can not quoted text"


def test_tokenizer_backend_selection(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert tokenize.resolve_backend("auto") == "python"
    with pytest.raises(Exception, match="java"):
        tokenize.resolve_backend("java")
    with pytest.raises(Exception, match="backend"):
        tokenize.resolve_backend("spacy")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------
# METEOR and SPICE


def _start_meteor_file_mode(refs: dict, cands: dict, num_refs: int, work: Path) -> subprocess.Popen:
    """Starts the METEOR jar on files (its own command-line mode, not pycocoevalcap's stdio protocol)."""
    from pycocoevalcap.meteor import meteor as meteor_module

    jar = Path(meteor_module.__file__).with_name(meteor_module.METEOR_JAR)
    (work / "test.txt").write_text("".join(c + "\n" for c in cands.values()))
    (work / "ref.txt").write_text("".join(r + "\n" for i in cands for r in refs[i]))
    cmd = ["java", "-Xmx2G", "-jar", str(jar), "test.txt", "ref.txt", "-l", "en", "-norm", "-r", str(num_refs)]
    return subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _meteor_file_mode_result(proc: subprocess.Popen) -> tuple[float, list[float]]:
    out, _ = proc.communicate()
    assert proc.returncode == 0
    segments = [float(x) for x in re.findall(r"Segment \d+ score:\s*(\S+)", out)]
    return float(re.search(r"Final score:\s*(\S+)", out).group(1)), segments


@needs_java
def test_meteor_matches_jar_and_corpus_is_jar_aggregate(tmp_path):
    refs = {
        1: ["a cat sitting on a mat", "a cat on the mat", "the cat is on a mat"],
        2: ["two dogs playing in the park", "dogs play in a park", "two dogs run on grass"],
        3: ["a red bus on a city street", "a bus driving down the road", "a double decker bus"],
        4: ["a plate of food", "food on a white plate", "a sandwich with fries"],
    }
    cands = {1: "a cat sits on a mat", 2: "two dogs in a park", 3: "a red bus", 4: "a bowl of soup on a table"}
    reference = _start_meteor_file_mode(refs, cands, 3, tmp_path)  # runs beside ours: the jar loads for seconds
    corpus, each = captions.meteor(refs, cands)
    want_corpus, want_each = _meteor_file_mode_result(reference)
    np.testing.assert_allclose(each, want_each, atol=TOL)
    assert abs(corpus - want_corpus) <= TOL
    assert abs(corpus - float(np.mean(each))) > 1e-3  # the jar's aggregate is not the mean of images
    # the jar is reused: a second call (other captions, then the first ones again) runs in the same JVM and
    # gives each set exactly the scores it gets alone (each EVAL line is self-contained)
    pid = captions._METEOR_SCORER.meteor_p.pid
    other = {1: "a dog on a mat", 2: "cats in a park"}
    corpus2, each2 = captions.meteor({k: refs[k] for k in other}, other)
    assert captions._METEOR_SCORER.meteor_p.pid == pid and not np.allclose(each2, each[:2])
    again, each_again = captions.meteor(refs, cands)
    np.testing.assert_array_equal(each_again, each)
    assert again == corpus
    # a jar that died is replaced by a fresh one on the next call
    captions._METEOR_SCORER.meteor_p.kill()
    captions._METEOR_SCORER.meteor_p.wait()
    third, each_third = captions.meteor({k: refs[k] for k in other}, other)
    assert captions._METEOR_SCORER.meteor_p.pid != pid
    np.testing.assert_array_equal(each_third, each2)


def test_spice_unavailable_is_reported_not_raised(monkeypatch):
    available, reason = captions.spice_status()
    if available:
        pytest.skip("Stanford CoreNLP is installed: SPICE is available here")
    assert "stanford-corenlp-3.6.0" in reason and "spice" in reason.lower()
    result = captions.evaluate_captions({1: ["A cat."]}, {1: "A cat"}, metrics=["BLEU-1", "SPICE"], tokenizer="python")
    assert set(result.scores) == {"BLEU-1"} and "SPICE" in result.unavailable
    assert "SPICE" in result.to_markdown()


def test_spice_failure_is_reported_not_raised(monkeypatch):
    from pycocoevalcap.spice import spice as spice_module

    class FailingSpice:  # what a jar crash (e.g. CoreNLP on an unsupported Java) looks like to pycocoevalcap
        def compute_score(self, gts, res):
            raise subprocess.CalledProcessError(1, ["java", "-jar", "spice-1.0.jar"])

    monkeypatch.setattr(captions, "spice_status", lambda: (True, ""))
    monkeypatch.setattr(spice_module, "Spice", FailingSpice)
    result = captions.evaluate_captions({1: ["a cat"], 2: ["a dog"]}, {1: "a cat", 2: "a bird"},
                                        metrics=["CIDEr-D", "SPICE"], tokenizer="python")
    assert "SPICE failed" in result.unavailable["SPICE"] and "CIDEr-D" in result.scores


def test_without_java_meteor_and_spice_unavailable_rest_runs(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    refs, cands = {1: ["A cat on a mat.", "A cat."]}, {1: "A cat on the mat."}
    result = captions.evaluate_captions(refs, cands)
    assert result.tokenizer == "python"
    assert "Java" in result.unavailable["METEOR"] and "Java" in result.unavailable["SPICE"]
    assert {"BLEU-4", "ROUGE-L", "CIDEr-D", "CIDEr"} <= set(result.scores)
    with pytest.raises(captions.MetricUnavailable, match="Java"):
        captions.meteor({1: ["a"]}, {1: "a"})


# ------------------------------------------------------------------------------------------------------
# Bad input


def test_candidate_without_references_names_ids():
    with pytest.raises(InputError, match=r"without references.*'b'.*'c'"):
        captions.bleu({"a": ["x y"], "c": []}, {"a": "x", "b": "y", "c": "z"})


def test_no_candidates_is_an_error():
    with pytest.raises(InputError, match="no candidate"):
        captions.rouge_l({1: ["a"]}, {})


def test_empty_and_non_string_candidates_name_ids():
    refs = {1: ["a cat"], 2: ["a dog"], 3: ["a bird"]}
    with pytest.raises(InputError, match=r"empty candidate.*\b2\b"):
        captions.evaluate_captions(refs, {1: "a cat", 2: "   ", 3: "a bird"}, metrics=["BLEU-1"], tokenizer="python")
    with pytest.raises(InputError, match=r"strings.*\b3\b"):
        captions.cider_d(refs, {1: "a cat", 2: "a dog", 3: 7})
    with pytest.raises(InputError, match=r"references.*\b1\b"):
        captions.rouge_l({1: ["a", None]}, {1: "a"})


def test_coco_file_errors_name_ids():
    with pytest.raises(InputError, match=r"duplicate image ids.*\b5\b"):
        captions.coco_results([{"image_id": 5, "caption": "a"}, {"image_id": 5, "caption": "b"}])
    with pytest.raises(InputError, match=r"non-string captions.*\b6\b"):
        captions.coco_results([{"image_id": 6, "caption": ["a"]}])
    ann = {"images": [{"id": 1}, {"id": 1}], "annotations": []}
    with pytest.raises(InputError, match=r"duplicate image ids.*\b1\b"):
        captions.coco_references(ann)
    ann = {"images": [{"id": 1}], "annotations": [{"id": 9, "image_id": 1, "caption": "a"},
                                                   {"id": 9, "image_id": 1, "caption": "b"}]}
    with pytest.raises(InputError, match=r"duplicate annotation ids.*\b9\b"):
        captions.coco_references(ann)
    with pytest.raises(InputError, match=r"not in 'images'.*\b4\b"):
        captions.coco_references({"images": [{"id": 1}], "annotations": [{"image_id": 4, "caption": "a"}]})


# ------------------------------------------------------------------------------------------------------
# Command line


def _run_py():
    spec = importlib.util.spec_from_file_location("vlpeft_run", Path(__file__).resolve().parents[2] / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_coco(tmp_path: Path, refs: dict, cands: dict) -> tuple[Path, Path]:
    ann = {"images": [{"id": i} for i in refs], "annotations": []}
    for i, caps in refs.items():
        for c in caps:
            ann["annotations"].append({"id": len(ann["annotations"]), "image_id": i, "caption": c})
    ann_path, res_path = tmp_path / "ann.json", tmp_path / "res.json"
    ann_path.write_text(json.dumps(ann))
    res_path.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in cands.items()]))
    return ann_path, res_path


def test_score_cli_end_to_end(tmp_path, capsys):
    refs = {
        1: ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave!", "Man surfing."],
        2: ["Two dogs play in the park.", "Dogs running on grass", "two puppies, playing"],
        3: ["A red bus on the street.", "A double-decker bus drives by.", "The bus is red"],
        4: ["An image that has no result."],
    }
    cands = {1: "A man riding a wave.", 2: "Two dogs playing on the grass.", 3: "A bus on a street"}
    ann_path, res_path = _write_coco(tmp_path, refs, cands)
    out = tmp_path / "out" / "metrics.json"
    metrics = "BLEU-1,BLEU-2,BLEU-3,BLEU-4,ROUGE-L,CIDEr-D,CIDEr,SPICE"  # METEOR is tested on its own
    status = _run_py().main(["score", "--refs", str(ann_path), "--results", str(res_path), "--out", str(out),
                             "--metrics", metrics, "--per-image"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "| metric | score |" in printed and "| CIDEr-D |" in printed
    result = json.loads(out.read_text())
    assert result["num_images"] == 3 and len(result["per_image"]) == 3

    # The COCO pipeline with pycocoevalcap's own tokenizer (Java) or our Python one, then its scorers.
    if result["tokenizer"] == "java":
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        gts = PTBTokenizer().tokenize({i: [{"caption": c} for c in refs[i]] for i in cands})
        res = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in cands.items()})
    else:
        gts = tokenize.ptb_tokenize({i: refs[i] for i in cands}, backend="python")
        res = tokenize.ptb_tokenize({i: [c] for i, c in cands.items()}, backend="python")
    want = coco_scores(gts, {i: r[0] for i, r in res.items()})
    for n in range(4):
        assert abs(result["metrics"][f"BLEU-{n + 1}"] - want["bleu"][0][n]) <= TOL
    assert abs(result["metrics"]["ROUGE-L"] - want["rouge"][0]) <= TOL
    assert abs(result["metrics"]["CIDEr-D"] - want["cider"][0]) <= TOL
    assert "SPICE" in result["metrics"] or "SPICE" in result["unavailable"]


def test_score_cli_bad_input_exits_2(tmp_path, capsys):
    ann_path, res_path = _write_coco(tmp_path, {1: ["a cat"]}, {1: "a cat", 42: "a dog"})
    status = _run_py().main(["score", "--refs", str(ann_path), "--results", str(res_path), "--tokenizer", "python"])
    assert status == 2
    assert "42" in capsys.readouterr().err


def test_bench_metrics_small_run():
    result = bench_metrics.run(["--images", "30", "--repeats", "1"])
    assert {r["metric"] for r in result["rows"]} >= {"BLEU-1..4", "ROUGE-L", "CIDEr-D"}
    assert result["max_abs_diff"] <= TOL


# ------------------------------------------------------------------------------------------------------
# CLIP-Score and r_TCM


def test_clip_score_formulas_match_definition():
    rng = np.random.default_rng(3)
    image, cand = rng.normal(size=(6, 16)), rng.normal(size=(6, 16))
    refs = [rng.normal(size=(k, 16)) for k in (1, 2, 3, 4, 5, 1)]
    refs[5] = -cand[5:6]  # a reference pointing away: its similarity is clipped to 0

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    want_clip = [2.5 * max(cos(image[i], cand[i]), 0.0) for i in range(6)]
    want_ref = [max(max(cos(cand[i], r) for r in refs[i]), 0.0) for i in range(6)]
    want_hm = [2 * c * r / (c + r) if c + r > 0 else 0.0 for c, r in zip(want_clip, want_ref, strict=True)]
    clip_s, ref_s = clipscore.ref_clip_score(image, cand, refs)
    np.testing.assert_allclose(clip_s, want_clip, atol=1e-12)
    np.testing.assert_allclose(ref_s, want_hm, atol=1e-12)
    assert ref_s[5] == 0.0  # the opposite reference: similarity clipped to 0, harmonic mean 0


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _clip_image_processor_class(transformers):
    """transformers' CLIP image processor with the PIL backend, OpenAI CLIP's own preprocessing (PIL bicubic):
    ``CLIPImageProcessorPil`` in transformers 5 (its ``CLIPImageProcessor`` may pick torchvision), the plain
    ``CLIPImageProcessor`` in transformers 4."""
    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random Hugging Face CLIPModel with a byte-level CLIP tokenizer (no merges) and an image processor.

    Both towers' final LayerNorms get a shared direction (the text bias is chosen so that the text projection
    maps it where the vision projection maps the vision bias) and smaller scales, so that every image-text
    and text-text cosine is positive: no CLIP-S or reference similarity is clipped to 0, and the parity test
    compares real values on both sides.
    """
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[])
    text_cfg = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=48, bos_token_id=len(vocab) - 2,
                    eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1)
    vision_cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      image_size=32, patch_size=8)
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=16)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        vision_ln, text_ln = model.vision_model.post_layernorm, model.text_model.final_layer_norm
        vision_ln.weight.mul_(0.5)
        text_ln.weight.mul_(0.5)
        b = torch.randn(32, generator=torch.Generator().manual_seed(1))
        vision_ln.bias.copy_(3.0 * b / b.norm())
        t = torch.linalg.pinv(model.text_projection.weight) @ (model.visual_projection.weight @ vision_ln.bias)
        text_ln.bias.copy_(3.0 * t / t.norm())
    d = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    # CLIP's layout (shortest edge = crop size), with a mean/std other than the defaults: read from this file
    _clip_image_processor_class(transformers)(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.45, 0.4, 0.35],
        image_std=[0.25, 0.3, 0.2]).save_pretrained(d)
    return d, model, tokenizer


def test_clip_scorer_matches_transformers_clip(tiny_clip_dir):
    """Our CLIP-S / RefCLIP-S (our preprocessing, Flax towers) vs transformers end to end: the checkpoint's
    image processor (PIL backend) prepares the reference's pixels; every compared score is positive."""
    import torch
    import transformers

    d, model, tokenizer = tiny_clip_dir
    scorer = clipscore.ClipScorer(d, batch_size=4)
    rng = np.random.default_rng(0)
    # aspect ratios where rounding and truncating the resized long edge differ (40, 46, 49 rows) and where
    # they agree; one landscape image, one smaller than the crop
    images = [rng.integers(0, 256, size=(40 + 3 * i, 36, 3), dtype=np.uint8) for i in range(5)]
    images += [rng.integers(0, 256, size=size, dtype=np.uint8) for size in ((33, 47, 3), (20, 20, 3))]
    cands = ["a dog on a beach", "two cats", "a red bus in the city", "a plate of food", "people", "a red car",
             "grass"]
    references = [["a dog runs", "a beach"], ["cats sleeping"], ["a bus", "red bus", "city street"],
                  ["food"], ["a crowd of people", "people walking"], ["a car", "a red car parked"], ["a lawn"]]
    result = scorer.score(images, cands, references)

    processor = _clip_image_processor_class(transformers).from_pretrained(d)
    pixels = torch.from_numpy(np.asarray(processor(images=images, return_tensors="np")["pixel_values"]))
    assert tuple(pixels.shape) == (7, 3, 32, 32)

    def text_features(texts):
        enc = tokenizer(["A photo depicts " + t for t in texts], padding=True, return_tensors="pt")
        return model.get_text_features(**enc)

    with torch.no_grad():
        img = _features(model.get_image_features(pixel_values=pixels)).numpy()
        cand = _features(text_features(cands)).numpy()
        refs = [_features(text_features(r)).numpy() for r in references]

    def cos(a, b):
        return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    image_text = np.array([cos(img[i], cand[i]) for i in range(7)])
    text_text = np.array([max(cos(cand[i], r) for r in refs[i]) for i in range(7)])
    assert image_text.min() > 0.1 and text_text.min() > 0.1  # nothing clipped to 0 on either side
    want_clip = 2.5 * np.maximum(image_text, 0)
    want_ref = np.maximum(text_text, 0)
    want_hm = np.where(want_clip + want_ref > 0, 2 * want_clip * want_ref / (want_clip + want_ref), 0)
    np.testing.assert_allclose(result["per_image"]["CLIP-S"], want_clip, atol=1e-4)
    np.testing.assert_allclose(result["per_image"]["RefCLIP-S"], want_hm, atol=1e-4)
    assert result["CLIP-S"] == pytest.approx(float(want_clip.mean()), abs=1e-4)


def _features(out):
    """``get_*_features`` returns a tensor (transformers 4) or an output with ``pooler_output`` (5)."""
    return out if hasattr(out, "numpy") else out.pooler_output


def test_r_tcm_matches_eq_10():
    rng = np.random.default_rng(5)
    topics = rng.integers(0, 4, size=(7, 12))
    lengths = rng.integers(1, 13, size=7)
    want = np.mean([np.mean([topics[i, j] != 0 for j in range(lengths[i])]) for i in range(7)])
    assert rtcm.r_tcm(topics, lengths=lengths) == pytest.approx(want, abs=1e-12)
    mask = np.arange(12)[None, :] < lengths[:, None]
    assert rtcm.r_tcm(topics, mask=mask) == pytest.approx(want, abs=1e-12)
    ragged = [topics[i, : lengths[i]].tolist() for i in range(7)]
    assert rtcm.r_tcm(ragged) == pytest.approx(want, abs=1e-12)
    with pytest.raises(InputError, match="no tokens"):
        rtcm.r_tcm(topics, lengths=np.zeros(7, int))
