"""Caption tokenisation compatible with the COCO caption evaluation (pycocoevalcap's ``PTBTokenizer``).

The COCO evaluation lower-cases and tokenises every caption with Stanford CoreNLP's ``PTBTokenizer`` (a
Java program shipped in pycocoevalcap as ``stanford-corenlp-3.4.1.jar``) and then drops the tokens in
:data:`PUNCTUATIONS`. Metric values depend on this step, so:

- ``backend="java"`` runs exactly that jar with pycocoevalcap's flags (``-preserveLines -lowerCase``),
  in one process for all captions, and applies the same punctuation filter. Unlike pycocoevalcap it
  writes its temporary file outside the installed package and replaces every line-break character (not
  only ``\\n``) by a space, so captions cannot shift onto their neighbours' lines; the number of output
  lines is checked.
- ``backend="python"`` is a pure-Python reimplementation of the parts of PTB tokenisation that matter for
  captions (see :func:`python_ptb_tokenize`), for machines without Java.
- ``backend="auto"`` (the default) uses Java when ``java`` is on ``PATH`` and the jar is installed.

Where the two backends agree and where they differ is pinned by ``tests/test_metrics.py``
(``test_python_tokenizer_agrees_with_ptb`` / ``test_python_tokenizer_known_differences``).

Example:
    >>> from vlpeft_jax.eval.tokenize import python_ptb_tokenize
    >>> python_ptb_tokenize("A dog's ball (red), isn't it?")
    "a dog 's ball -lrb- red -rrb- is n't it"
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Literal, TypeVar

from vlpeft_jax.errors import ConfigError, InputError

K = TypeVar("K", bound=Hashable)
Backend = Literal["auto", "java", "python"]

# Exactly pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS. It lists the bracket escapes in upper case
# while the tokenizer runs with -lowerCase, so "-lrb-" etc. survive in the COCO evaluation; we keep that.
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

PTB_JAR_NAME = "stanford-corenlp-3.4.1.jar"

# Characters Java's line reader (or PTBTokenizer with -preserveLines) treats as line ends.
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def ptb_jar_path() -> Path | None:
    """The Stanford CoreNLP jar shipped with pycocoevalcap, or None if pycocoevalcap is not installed."""
    try:
        from pycocoevalcap.tokenizer import ptbtokenizer
    except ImportError:
        return None
    jar = Path(ptbtokenizer.__file__).with_name(PTB_JAR_NAME)
    return jar if jar.is_file() else None


def java_available() -> bool:
    """Whether a ``java`` executable is on ``PATH``."""
    return shutil.which("java") is not None


def resolve_backend(backend: Backend = "auto") -> Literal["java", "python"]:
    """Which tokenizer ``backend`` means here: "auto" is "java" when Java and the jar are present."""
    if backend == "python":
        return "python"
    if backend not in ("auto", "java"):
        raise ConfigError(f"tokenizer backend {backend!r} is not one of 'auto', 'java', 'python'")
    if java_available() and ptb_jar_path() is not None:
        return "java"
    if backend == "java":
        why = "no 'java' on PATH" if not java_available() else f"pycocoevalcap's {PTB_JAR_NAME} is missing"
        raise ConfigError(f"tokenizer backend 'java' is unavailable: {why}; use backend='python' or 'auto'")
    return "python"


def ptb_tokenize(captions: Mapping[K, Sequence[str]], backend: Backend = "auto") -> dict[K, list[str]]:
    """Tokenises captions as the COCO evaluation does: ``{id: [caption, ...]} -> {id: [tokens joined by ' ']}``.

    Args:
      captions: captions per image (or any key); values are lists of raw strings.
      backend: "java" (pycocoevalcap's PTBTokenizer), "python" (:func:`python_ptb_tokenize`) or "auto".

    Returns:
      The same keys in the same order, each with its captions lower-cased, tokenised, with
      :data:`PUNCTUATIONS` removed and tokens joined by single spaces.

    Example:
        >>> ptb_tokenize({1: ["A Cat, sitting."]}, backend="python")
        {1: ['a cat sitting']}
    """
    for key, caps in captions.items():
        if isinstance(caps, str) or not all(isinstance(c, str) for c in caps):
            raise InputError(f"captions for id {key!r} must be a list of strings, got {caps!r}")
    if resolve_backend(backend) == "python":
        return {key: [python_ptb_tokenize(c) for c in caps] for key, caps in captions.items()}
    flat = [c for caps in captions.values() for c in caps]
    lines = _java_ptb_lines(flat)
    out: dict[K, list[str]] = {}
    i = 0
    for key, caps in captions.items():
        out[key] = [_drop_punctuation(line) for line in lines[i : i + len(caps)]]
        i += len(caps)
    return out


def _drop_punctuation(line: str) -> str:
    return " ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS)


def _java_ptb_lines(sentences: list[str]) -> list[str]:
    """Runs the PTBTokenizer jar once over all sentences (one per line) and returns one line per sentence."""
    if not sentences:
        return []
    jar = ptb_jar_path()
    if jar is None or not java_available():
        raise ConfigError("the Java PTB tokenizer needs 'java' on PATH and pycocoevalcap's " + PTB_JAR_NAME)
    text = "\n".join(_LINE_BREAKS.sub(" ", s) for s in sentences)
    with tempfile.TemporaryDirectory(prefix="vlpeft_ptb_") as tmp:
        path = os.path.join(tmp, "captions.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", path]
        proc = subprocess.run(cmd, capture_output=True, env={**os.environ, "LC_ALL": "C.UTF-8"})
    if proc.returncode != 0:
        raise RuntimeError(f"PTBTokenizer failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-2000:]}")
    lines = proc.stdout.decode("utf-8").split("\n")
    if len(lines) < len(sentences):
        raise RuntimeError(f"PTBTokenizer returned {len(lines)} lines for {len(sentences)} captions")
    return lines[: len(sentences)]


# ---------------------------------------------------------------------------------------------------------
# Pure-Python PTB-like tokenizer
# ---------------------------------------------------------------------------------------------------------

# Abbreviations PTBTokenizer keeps with their period (a subset of its list: the ones that occur in captions).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs etc inc ltd co corp mt ft ave rd no approx dept est fig jan feb mar apr "
    "jun jul aug sep sept oct nov dec".split()
)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# Words PTBTokenizer splits in two (from its lexer's list of "split words").
_SPLIT_WORDS = {
    "cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na", "lemme": "lem me",
    "gimme": "gim me", "'tis": "'t is", "'twas": "'t was",
}
_QUOTE_NORMALISATION = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u00a0": " "})
_CLITIC = re.compile(r"^(.*[a-z0-9])(n't|'s|'m|'re|'ve|'ll|'d)$")
_NUMBER = re.compile(r"^[+-]?(\d+([.,:/]\d+)*|\.\d+)$")
_EDGE_SYMBOLS = "$%*=+|~^&"


def python_ptb_tokenize(text: str) -> str:
    """Pure-Python approximation of ``PTBTokenizer -preserveLines -lowerCase`` plus pycocoevalcap's filter.

    Rules, in order (each mirrors PTBTokenizer's behaviour on English captions):

    1. Line breaks become spaces; curly quotes become straight quotes; everything is lower-cased.
    2. Double quotes are quote tokens (which the COCO filter drops); brackets become ``-lrb- -rrb- -lsb-
       -rsb- -lcb- -rcb-`` (kept: pycocoevalcap's filter lists them upper-case).
    3. ``...``, ``--``, ``,``, ``;``, runs of ``!``/``?`` and ``:`` split off words; commas and colons
       inside numbers (``1,000``, ``10:30``) and the colon of ``http://`` stay.
    4. A final period splits off unless the word is a number, contains another period (``u.s.``, ``a.m.``)
       or is a common abbreviation (``mr.``, ``st.``, ...).
    5. Single quotes at word edges are quote tokens (dropped), except clitics: ``n't 's 'm 're 've 'll 'd``
       split off their word (``doesn't`` -> ``does n't``, ``can't`` -> ``ca n't``), and ``cannot``,
       ``gonna``, ``gotta``, ``wanna`` split as PTB does.
    6. ``$ % * = + | ~ ^ &`` split off the start or end of a word; hyphens, slashes and symbols
       inside a word stay (``black-and-white``, ``yes/no``, ``at&t``).
    7. Tokens in :data:`PUNCTUATIONS` are dropped.

    Not reproduced (see the tests for the exact list): SGML-like ``<tags>``, underscores, e-mail/URL
    edge cases, PTB's full abbreviation list, unicode symbol normalisation.

    Example:
        >>> python_ptb_tokenize('Mr. Smith said "don\\'t go" -- 1,000 times.')
        "mr. smith said do n't go 1,000 times"
    """
    text = _LINE_BREAKS.sub(" ", text).translate(_QUOTE_NORMALISATION).lower()
    text = text.replace('"', " '' ")
    for bracket, escape in _BRACKETS.items():
        text = text.replace(bracket, f" {escape} ")
    text = re.sub(r"\.\.\.+", " ... ", text)
    text = re.sub(r"--+", " -- ", text)
    text = re.sub(r"([!?]+|;)", r" \1 ", text)  # PTB keeps runs such as "?!" as one token
    text = re.sub(r",(?!\d)|(?<!\d),", " , ", text)  # a comma stays only between digits
    text = re.sub(r":(?!\d|//)|(?<!\d):(?!//)", " : ", text)  # keeps "10:30" and "http://"
    tokens: list[str] = []
    for word in text.split():
        tokens.extend(_split_word(word))
    return " ".join(t for t in tokens if t not in PUNCTUATIONS)


def _split_word(word: str) -> list[str]:
    """Splits one whitespace-delimited chunk into PTB tokens (rules 4-6 of :func:`python_ptb_tokenize`)."""
    if word in _SPLIT_WORDS:
        return _SPLIT_WORDS[word].split()
    if word in PUNCTUATIONS or word.startswith("-") and word.endswith("-") and len(word) > 2:
        return [word]
    head: list[str] = []
    tail: list[str] = []
    changed = True
    while word and changed:
        changed = False
        if word[0] in _EDGE_SYMBOLS and len(word) > 1:
            head.append(word[0])
            word, changed = word[1:], True
        elif word[-1] in _EDGE_SYMBOLS and len(word) > 1:
            tail.insert(0, word[-1])
            word, changed = word[:-1], True
        elif word.startswith(("'", "`")) and len(word) > 1 and word not in _SPLIT_WORDS:
            head.append("`")
            word, changed = word[1:], True
        elif word.endswith("'") and len(word) > 1:
            tail.insert(0, "'")
            word, changed = word[:-1], True
        elif word.endswith(".") and len(word) > 1 and not _keeps_period(word):
            tail.insert(0, ".")
            word, changed = word[:-1], True
    if word in _SPLIT_WORDS:
        return head + _SPLIT_WORDS[word].split() + tail
    match = _CLITIC.match(word)
    if match:
        return head + list(match.groups()) + tail
    return head + ([word] if word else []) + tail


def _keeps_period(word: str) -> bool:
    stem = word[:-1]
    return bool(_NUMBER.match(word)) or "." in stem or stem in _ABBREVIATIONS
