"""A word-level tokenizer (Hugging Face ``tokenizers``) saved in Hugging Face format.

Text is NFKC-normalised and lowercased, split on whitespace, and every punctuation character becomes its own
token. Ids are assigned deterministically: the special tokens first (``<pad>`` = 0, ``<bos>``, ``<eos>``,
``<unk>``, ``<image>``), then words by decreasing frequency, ties alphabetically. Encoding with
``add_special_tokens=True`` gives ``<bos> text <eos>`` (the caption-LM sequence); decoding drops the space
before punctuation. :meth:`WordTokenizer.save` writes ``tokenizer.json``, ``tokenizer_config.json`` and
``special_tokens_map.json`` so that ``transformers.AutoTokenizer.from_pretrained(dir)`` and
``PreTrainedTokenizerFast.from_pretrained(dir)`` load it.

Example:
    >>> tok = WordTokenizer.train(["a red circle.", "a blue square"])
    >>> ids = tok.encode("A red square.")
    >>> ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    True
    >>> tok.decode(ids)
    'a red square.'
"""

from __future__ import annotations

import collections
import functools
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from vlpeft_jax import files
from vlpeft_jax.errors import CheckpointError, InputError

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<bos>", "<eos>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)


def _pipeline(tok: Tokenizer) -> Tokenizer:
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    # WordPiece's decoder with cleanup joins words with spaces and removes the space before ". , ? !"
    # (no word starts with "##", so its prefix handling never applies); the Replace steps do ":" and ";".
    tok.decoder = decoders.Sequence([decoders.WordPiece(prefix="##", cleanup=True),
                                     decoders.Replace(" :", ":"), decoders.Replace(" ;", ";")])
    return tok


@functools.cache
def _probe() -> Tokenizer:
    return _pipeline(Tokenizer(models.WordLevel({UNK: 0}, unk_token=UNK)))


def split_words(text: str) -> list[str]:
    """The words the tokenizer sees in ``text`` (after lowercasing and punctuation splitting).

    Example:
        >>> split_words("Two objects: a RED circle.")
        ['two', 'objects', ':', 'a', 'red', 'circle', '.']
    """
    probe = _probe()
    normalized = probe.normalizer.normalize_str(text)
    return [w for w, _ in probe.pre_tokenizer.pre_tokenize_str(normalized)]


class WordTokenizer:
    """A word-level tokenizer with fixed special tokens; wraps a ``tokenizers.Tokenizer``.

    Build one with :meth:`train` (from texts) or :meth:`load` (from a saved directory).

    Example:
        >>> tok = WordTokenizer.train(["a red circle"])
        >>> tok.encode("a green circle", add_special_tokens=False) == [tok.token_to_id("a"), tok.unk_id,
        ...                                                          tok.token_to_id("circle")]
        True
    """

    def __init__(self, tokenizer: Tokenizer, model_max_length: int = 128):
        self.tokenizer = tokenizer
        self.model_max_length = int(model_max_length)
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise InputError(f"tokenizer lacks special tokens {missing}; expected all of {list(SPECIAL_TOKENS)}")
        self.pad_id = tokenizer.token_to_id(PAD)
        self.bos_id = tokenizer.token_to_id(BOS)
        self.eos_id = tokenizer.token_to_id(EOS)
        self.unk_id = tokenizer.token_to_id(UNK)
        self.image_id = tokenizer.token_to_id(IMAGE)

    @classmethod
    def train(cls, texts: Iterable[str], extra_words: Iterable[str] = (), min_frequency: int = 1,
              model_max_length: int = 128) -> WordTokenizer:
        """Builds the vocabulary from ``texts`` (plus ``extra_words``, always kept) deterministically."""
        counts: collections.Counter[str] = collections.Counter()
        for text in texts:
            counts.update(split_words(text))
        for word in extra_words:
            for w in split_words(word):
                counts[w] = max(counts[w], min_frequency)
        for special in SPECIAL_TOKENS:
            counts.pop(special, None)
        words = sorted((w for w, c in counts.items() if c >= min_frequency), key=lambda w: (-counts[w], w))
        vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
        for w in words:
            vocab[w] = len(vocab)
        tok = _pipeline(Tokenizer(models.WordLevel(vocab, unk_token=UNK)))
        tok.add_special_tokens(list(SPECIAL_TOKENS))
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B:1 {EOS}:1",
            special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
        return cls(tok, model_max_length)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.tokenizer.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        return self.tokenizer.id_to_token(int(index))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with special tokens: ``[<bos>, ..., <eos>]``."""
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [list(e.ids) for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; ``<pad>``/``<bos>``/``<eos>``/``<image>`` are dropped unless asked for."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch_ids: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch_ids]

    def unknown_words(self, text: str) -> list[str]:
        """Words of ``text`` that are not in the vocabulary (would become ``<unk>``)."""
        vocab = self.get_vocab()
        return [w for w in split_words(text) if w not in vocab]

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes the tokenizer in Hugging Face format into ``directory`` and returns it."""
        d = Path(directory)
        files.write_text(d / "tokenizer.json", self.tokenizer.to_str())  # each file atomically
        special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
                   "additional_special_tokens": [IMAGE]}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
                  "model_max_length": self.model_max_length, "padding_side": "right",
                  "clean_up_tokenization_spaces": False, "do_lower_case": True}
        files.write_json(d / "tokenizer_config.json", config)
        files.write_json(d / "special_tokens_map.json", special)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> WordTokenizer:
        """Loads a tokenizer written by :meth:`save` (only ``tokenizer.json`` is needed)."""
        d = Path(directory)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise InputError(f"no tokenizer.json in {d}")
        max_len = 128
        cfg_path = d / "tokenizer_config.json"
        if cfg_path.is_file():
            with open(cfg_path) as fh:
                max_len = int(json.load(fh).get("model_max_length", max_len))
        return cls(Tokenizer.from_file(str(path)), max_len)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size})"


def load_pretrained_tokenizer(model_dir: str | os.PathLike) -> Any:
    """The tokenizer saved in a local checkpoint folder (transformers ``AutoTokenizer``, offline; nothing is
    downloaded). Raises :class:`~vlpeft_jax.errors.CheckpointError` when there is none."""
    from transformers import AutoTokenizer

    d = Path(model_dir).expanduser()
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {str(model_dir)!r} does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{d}: no loadable tokenizer ({e})") from None
