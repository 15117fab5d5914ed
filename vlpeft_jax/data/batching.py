"""Example records, the loaders' error policy, and fixed-size numpy batches for a prefix VLM.

Every data source (shapes world, COCO/Karpathy, VQA JSON, Hugging Face ``datasets``, TFDS) produces the
records defined here — :class:`CaptionExample` (an image and its reference captions) or :class:`VQAExample`
(an image, a question and its answers) — and the batch builders below turn them into numpy dicts with a
fixed batch size, ready for ``jax.device_put(batch, sharding)``:

Training (:class:`CaptionBatches`, :class:`VQABatches`), right-padded to ``max_length``::

    pixel_values   float32 [b, H, W, 3]  resized to the tower's size, (x/255 - mean)/std
    input_ids      int32   [b, t]        <bos> [prompt] target <eos> <pad>...
    attention_mask int32   [b, t]        1 on real tokens
    labels         int32   [b, t]        = input_ids on target tokens and <eos>; -100 on <bos>, prompt, padding
    example_index  int32   [b]           index into the examples; -1 on padding rows
    valid          bool    [b]           False on padding rows (whose labels are all -100)

``labels`` follow the Hugging Face convention: ``labels[:, t]`` is the token at position ``t``, and the loss
compares it with the logits at position ``t - 1`` (the shift happens in the loss, not here).

Evaluation (:class:`EvalBatches`), the prompt left-padded so that generation continues every row at the
same position: ``pixel_values``, ``input_ids`` (``<pad>... <bos> [prompt]``), ``attention_mask``,
``example_index`` and ``valid``; references/answers are looked up as ``examples[example_index]``.

Determinism: batches depend only on (seed, step). Epoch ``e`` visits the items in the order of
``np.random.default_rng([seed, e]).permutation(n)``; :meth:`CaptionBatches.batch` builds the batch of any
global step directly, so a resumed run sees exactly the batches an uninterrupted one would. With
``drop_remainder=True`` (training default) an epoch has ``n // batch_size`` steps and the last partial batch
of each epoch is dropped (a different remainder every epoch, since the order is reshuffled); with
``drop_remainder=False`` the last batch is filled with padding rows marked ``valid=False``.

Example:
    >>> import numpy as np
    >>> from vlpeft_jax.data.tokenizer import WordTokenizer
    >>> from vlpeft_jax.data.images import ImagePreprocessor
    >>> examples = [CaptionExample(f"im{i}", ("a red circle", "a red disc"), image=np.zeros((8, 8, 3), np.uint8))
    ...             for i in range(3)]
    >>> tok = WordTokenizer.train(["a red circle", "a red disc"])
    >>> batches = CaptionBatches(examples, tok, ImagePreprocessor(size=8), batch_size=2, max_length=6)
    >>> b = batches.batch(0)
    >>> b["pixel_values"].shape, b["input_ids"].shape, int(b["labels"][0, 0])
    ((2, 8, 8, 3), (2, 6), -100)
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlpeft_jax.data.images import ImagePreprocessor
from vlpeft_jax.errors import InputError

IGNORE_INDEX = -100
ON_ERROR_CHOICES = ("raise", "skip")
# PETAL (seed 001, Appendix C, Table 7): the task-specific instruction for VQA.
VQA_PROMPT_TEMPLATE = "Question: {question} Short answer:"


# --------------------------------------------------------------------------------------------- records
@dataclasses.dataclass(frozen=True)
class CaptionExample:
    """An image with its reference captions.

    ``image`` is a ``uint8 [h, w, 3]`` array when decoded at load time; otherwise ``image_path`` names the
    file, decoded when a batch needs it. ``prompt`` is an optional instruction placed before the caption.
    """

    image_id: str
    captions: tuple[str, ...]
    image: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
    image_path: str | None = None
    prompt: str | None = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)


@dataclasses.dataclass(frozen=True)
class VQAExample:
    """A question about an image with its (usually 10) human answers."""

    question_id: str
    image_id: str
    question: str
    answers: tuple[str, ...]
    image: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
    image_path: str | None = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def answer(self) -> str:
        """The most frequent answer (ties: the one given first); the training target."""
        if not self.answers:
            raise InputError(f"question {self.question_id!r} has no answers")
        counts = collections.Counter(self.answers)
        best = max(counts.values())
        return next(a for a in self.answers if counts[a] == best)


Example = CaptionExample | VQAExample


# -------------------------------------------------------------------------------- error policy, results
class DataSkipWarning(UserWarning):
    """Issued when a loader skipped bad input (``on_error="skip"``); the message is the skip summary."""


class SkipReport:
    """Counts what a loader skipped, by reason, or raises at the first problem (``on_error="raise"``).

    Example:
        >>> r = SkipReport("demo.json", on_error="skip")
        >>> r.problem("empty caption", "image 7: caption 2 is empty")
        >>> r.finish(loaded=9, warn=False)
        >>> r.summary()
        'demo.json: loaded 9, skipped 1 (empty caption: 1); first: image 7: caption 2 is empty'
    """

    def __init__(self, source: str, on_error: str = "raise"):
        if on_error not in ON_ERROR_CHOICES:
            raise InputError(f"on_error must be one of {ON_ERROR_CHOICES}; got {on_error!r}")
        self.source = source
        self.on_error = on_error
        self.counts: collections.Counter[str] = collections.Counter()
        self.details: list[str] = []
        self.loaded = 0

    def problem(self, reason: str, detail: str) -> None:
        """Reports bad input: raises :class:`InputError` (``"raise"``) or counts it (``"skip"``)."""
        if self.on_error == "raise":
            raise InputError(f"{self.source}: {detail} [{reason}; pass on_error='skip' to skip and count these]")
        self.counts[reason] += 1
        if len(self.details) < 20:
            self.details.append(detail)

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def finish(self, loaded: int, warn: bool = True) -> None:
        """Records the number of examples kept; warns with :meth:`summary` when anything was skipped."""
        self.loaded = loaded
        if warn and self.skipped:
            warnings.warn(self.summary(), DataSkipWarning, stacklevel=3)

    def summary(self) -> str:
        """One line: what was loaded, what was skipped and why, and the first skipped item."""
        if not self.skipped:
            return f"{self.source}: loaded {self.loaded}, skipped 0"
        reasons = ", ".join(f"{r}: {c}" for r, c in sorted(self.counts.items()))
        return f"{self.source}: loaded {self.loaded}, skipped {self.skipped} ({reasons}); first: {self.details[0]}"


@dataclasses.dataclass
class LoadedDataset(Sequence):
    """What a loader returns: the examples (a sequence) and the :class:`SkipReport` of the load."""

    examples: list[Any]
    report: SkipReport

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):  # type: ignore[override]
        return self.examples[i]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.examples)


def read_json(path: str | os.PathLike) -> Any:
    """Reads a JSON file; a missing or malformed file raises :class:`InputError` naming it."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"annotation file not found: {p}")
    try:
        with open(p, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise InputError(f"{p} is not valid JSON: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {p}: {e}") from None


def example_image(example: Example, preprocessor: ImagePreprocessor) -> np.ndarray:
    """The example's image as ``uint8 [H, W, 3]`` at the preprocessor's size (decoding the file if needed)."""
    if example.image is not None:
        name = example.image_path or f"image {example.image_id!r}"
        return preprocessor.to_uint8(example.image, name)
    if example.image_path is not None:
        return preprocessor.to_uint8(example.image_path)
    raise InputError(f"example for image {example.image_id!r} has neither an image array nor an image_path")


# ------------------------------------------------------------------------------------------ text codec
@dataclasses.dataclass(frozen=True)
class TextCodec:
    """The four things batching needs from a tokenizer. ``bos_id=None`` means no <bos> is prepended."""

    encode: Callable[[str], list[int]]
    bos_id: int | None
    eos_id: int
    pad_id: int


def text_codec(tokenizer: Any) -> TextCodec:
    """Adapts our :class:`~vlpeft_jax.data.tokenizer.WordTokenizer` or a ``transformers`` tokenizer.

    For a ``transformers`` tokenizer without a pad token the eos id pads (GPT-2 style); without a bos token
    none is prepended.
    """
    if isinstance(tokenizer, TextCodec):
        return tokenizer
    if hasattr(tokenizer, "bos_id") and hasattr(tokenizer, "pad_id"):  # WordTokenizer
        return TextCodec(lambda s: tokenizer.encode(s, add_special_tokens=False), tokenizer.bos_id,
                         tokenizer.eos_id, tokenizer.pad_id)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise InputError(f"tokenizer {type(tokenizer).__name__} has no eos token; captions need one to end")
    pad = getattr(tokenizer, "pad_token_id", None)
    return TextCodec(lambda s: list(tokenizer.encode(s, add_special_tokens=False)),
                     getattr(tokenizer, "bos_token_id", None), int(eos), int(eos if pad is None else pad))


# ----------------------------------------------------------------------------------- sequence builders
def build_lm_sequences(prompts: Sequence[str | None], targets: Sequence[str], tokenizer: Any,
                       max_length: int) -> tuple[dict[str, np.ndarray], int]:
    """Right-padded ``<bos> [prompt] target <eos>`` rows; returns the arrays and how many were truncated.

    Labels are ``-100`` on ``<bos>``, prompt and padding. A row longer than ``max_length`` keeps its prompt
    and loses the end of its target (and its ``<eos>``).

    Example:
        >>> codec = TextCodec(lambda s: [ord(c) for c in s], bos_id=1, eos_id=2, pad_id=0)
        >>> arrays, truncated = build_lm_sequences(["q"], ["ab"], codec, max_length=7)
        >>> arrays["input_ids"].tolist(), arrays["labels"].tolist()
        ([[1, 113, 97, 98, 2, 0, 0]], [[-100, -100, 97, 98, 2, -100, -100]])
    """
    codec = text_codec(tokenizer)
    n = len(targets)
    ids = np.full((n, max_length), codec.pad_id, np.int32)
    labels = np.full((n, max_length), IGNORE_INDEX, np.int32)
    mask = np.zeros((n, max_length), np.int32)
    truncated = 0
    for i, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        head = ([codec.bos_id] if codec.bos_id is not None else []) + (codec.encode(prompt) if prompt else [])
        tail = codec.encode(target) + [codec.eos_id]
        if len(head) >= max_length:
            raise InputError(f"prompt {prompt!r} takes {len(head)} tokens, leaving none of max_length={max_length} "
                             "for the target; raise max_length or shorten the prompt")
        if len(head) + len(tail) > max_length:
            truncated += 1
            tail = tail[:max_length - len(head)]
        row = head + tail
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
        labels[i, len(head):len(row)] = tail
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, truncated


def build_prompt_sequences(prompts: Sequence[str | None], tokenizer: Any, max_length: int) -> dict[str, np.ndarray]:
    """Left-padded ``<bos> [prompt]`` rows for generation (a prompt too long keeps ``<bos>`` and its end).

    Example:
        >>> codec = TextCodec(lambda s: [ord(c) for c in s], bos_id=1, eos_id=2, pad_id=0)
        >>> build_prompt_sequences(["q", None], codec, 3)["input_ids"].tolist()
        [[0, 1, 113], [0, 0, 1]]
    """
    codec = text_codec(tokenizer)
    n = len(prompts)
    ids = np.full((n, max_length), codec.pad_id, np.int32)
    mask = np.zeros((n, max_length), np.int32)
    for i, prompt in enumerate(prompts):
        body = codec.encode(prompt) if prompt else []
        head = [codec.bos_id] if codec.bos_id is not None else []
        body = body[max(0, len(body) - (max_length - len(head))):]
        row = head + body
        if not row:  # no bos and no prompt: generation needs one position to start from
            row = [codec.eos_id]
        ids[i, max_length - len(row):] = row
        mask[i, max_length - len(row):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def build_text_sequences(texts: Sequence[str], tokenizer: Any, max_length: int,
                         add_special_tokens: bool = True) -> dict[str, np.ndarray]:
    """Right-padded token ids of whole texts (no targets), e.g. an InstructBLIP Q-Former's instruction text
    (``qformer_input_ids`` / ``qformer_attention_mask``); ``<bos> text <eos>`` with ``add_special_tokens``.

    A text longer than ``max_length`` raises :class:`InputError` (its end would be cut silently otherwise).

    Example:
        >>> codec = TextCodec(lambda s: [ord(c) for c in s], bos_id=1, eos_id=2, pad_id=0)
        >>> build_text_sequences(["ab", ""], codec, 5)["input_ids"].tolist()
        [[1, 97, 98, 2, 0], [1, 2, 0, 0, 0]]
    """
    codec = text_codec(tokenizer)
    ids = np.full((len(texts), max_length), codec.pad_id, np.int32)
    mask = np.zeros((len(texts), max_length), np.int32)
    for i, text in enumerate(texts):
        row = codec.encode(text) if text else []
        if add_special_tokens:
            row = ([codec.bos_id] if codec.bos_id is not None else []) + row + [codec.eos_id]
        if len(row) > max_length:
            raise InputError(f"text {text!r} takes {len(row)} tokens, more than max_length={max_length}")
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


# ------------------------------------------------------------------------------------------- sampling
class EpochSampler:
    """Deterministic epoch shuffling: the item indices of any global step, from (seed, step) alone.

    Example:
        >>> s = EpochSampler(num_items=5, batch_size=2, seed=0, drop_remainder=False)
        >>> s.steps_per_epoch, sorted(np.concatenate([s.indices(k) for k in range(3)]).tolist())
        (3, [-1, 0, 1, 2, 3, 4])
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_remainder: bool = True):
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1; got {batch_size}")
        if num_items < 1:
            raise InputError("cannot batch an empty dataset (0 examples)")
        if drop_remainder and num_items < batch_size:
            raise InputError(f"{num_items} examples make no full batch of {batch_size}; lower batch_size or "
                             "use drop_remainder=False")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.shuffle, self.drop_remainder = shuffle, drop_remainder
        self.steps_per_epoch = num_items // batch_size if drop_remainder else -(-num_items // batch_size)
        self._order_cache: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        else:
            order = np.arange(self.num_items)
        self._order_cache = (epoch, order)
        return order

    def indices(self, step: int) -> np.ndarray:
        """Item indices of global ``step`` (length ``batch_size``; ``-1`` marks padding rows)."""
        epoch, k = divmod(int(step), self.steps_per_epoch)
        chunk = self.order(epoch)[k * self.batch_size:(k + 1) * self.batch_size]
        out = np.full(self.batch_size, -1, np.int64)
        out[:len(chunk)] = chunk
        return out


PromptArg = str | Callable[[Any], str | None] | None


def _resolve_prompt(prompt: PromptArg, example: Any) -> str | None:
    if callable(prompt):
        return prompt(example)
    if prompt is not None:
        return prompt
    if isinstance(example, VQAExample):
        return VQA_PROMPT_TEMPLATE.format(question=example.question)
    return getattr(example, "prompt", None)


class _ImageSource:
    """uint8 images at the tower's size by example index, decoded once when ``cache`` is on."""

    def __init__(self, examples: Sequence[Example], preprocessor: ImagePreprocessor, cache: bool):
        self.examples, self.preprocessor, self.cache = examples, preprocessor, cache
        self._cache: dict[int, np.ndarray] = {}

    def pixel_values(self, indices: np.ndarray) -> np.ndarray:
        h, w = self.preprocessor.height_width
        out = np.zeros((len(indices), h, w, 3), np.uint8)
        for row, i in enumerate(indices):
            if i < 0:
                continue
            img = self._cache.get(int(i))
            if img is None:
                img = example_image(self.examples[int(i)], self.preprocessor)
                if self.cache:
                    self._cache[int(i)] = img
            out[row] = img
        pixels = self.preprocessor.normalize(out)
        pixels[np.asarray(indices) < 0] = 0.0
        return pixels


class _LMBatches:
    """Training batches over items (example index, prompt, target); see the module docstring."""

    def __init__(self, examples: Sequence[Example], items: list[tuple[int, str | None, str]], tokenizer: Any,
                 preprocessor: ImagePreprocessor, batch_size: int, max_length: int, seed: int, shuffle: bool,
                 drop_remainder: bool, cache_images: bool):
        self.examples = examples
        self.items = items
        self.codec = text_codec(tokenizer)
        self.preprocessor = preprocessor
        self.batch_size, self.max_length = batch_size, max_length
        self.sampler = EpochSampler(len(items), batch_size, seed, shuffle, drop_remainder)
        self.images = _ImageSource(examples, preprocessor, cache_images)
        self.truncated = 0  # rows whose target was cut at max_length, over all batches built

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _item(self, index: int, step: int) -> tuple[int, str | None, str]:
        return self.items[index]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The batch of global ``step`` (epoch ``step // steps_per_epoch``)."""
        idx = self.sampler.indices(step)
        rows = [self._item(int(i), step) if i >= 0 else None for i in idx]
        prompts = [r[1] if r else None for r in rows]
        targets = [r[2] if r else "" for r in rows]
        arrays, truncated = build_lm_sequences(prompts, targets, self.codec, self.max_length)
        self.truncated += truncated
        example_index = np.array([r[0] if r else -1 for r in rows], np.int32)
        valid = example_index >= 0
        # Padding rows: a lone <bos> (never an all-zero mask, which some attention kernels turn into NaN)
        # and no labels, so they add nothing to the loss.
        arrays["input_ids"][~valid] = self.codec.pad_id
        arrays["input_ids"][~valid, 0] = self.codec.bos_id if self.codec.bos_id is not None else self.codec.eos_id
        arrays["attention_mask"][~valid] = 0
        arrays["attention_mask"][~valid, 0] = 1
        arrays["labels"][~valid] = IGNORE_INDEX
        return {"pixel_values": self.images.pixel_values(example_index), **arrays,
                "example_index": example_index, "valid": valid}

    def epoch(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        """The batches of one epoch, in order."""
        for k in range(self.steps_per_epoch):
            yield self.batch(epoch * self.steps_per_epoch + k)

    def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Batches from ``start_step`` on (across epochs); forever when ``num_steps`` is None."""
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            yield self.batch(step)
            step += 1

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.iterate()


class CaptionBatches(_LMBatches):
    """Caption-LM training batches: ``<bos> [prompt] caption <eos>`` with the image as prefix.

    Args:
        examples: :class:`CaptionExample` records (or anything with ``image_id``/``captions``/``image``).
        tokenizer: a :class:`~vlpeft_jax.data.tokenizer.WordTokenizer`, a ``transformers`` tokenizer or a
            :class:`TextCodec`.
        preprocessor: the vision tower's :class:`ImagePreprocessor` (size, mean, std).
        batch_size, max_length: fixed batch shape ``[batch_size, max_length]``.
        seed, shuffle, drop_remainder: see the module docstring.
        prompt: an instruction before every caption (not a target): a string, a function of the example,
            or None to use ``example.prompt`` when set.
        pairs: ``"all"`` makes every (image, caption) pair an item (an epoch sees every reference);
            ``"sample"`` makes every image an item with one reference drawn per step from (seed, step).
        cache_images: keep each decoded, resized image after first use.

    Example:
        >>> import numpy as np
        >>> from vlpeft_jax.data.tokenizer import WordTokenizer
        >>> ex = [CaptionExample("a", ("one two",), image=np.zeros((4, 4, 3), np.uint8))]
        >>> tok = WordTokenizer.train(["one two"])
        >>> b = CaptionBatches(ex, tok, ImagePreprocessor(size=4), 1, 5).batch(0)
        >>> tok.decode(b["input_ids"][0]), b["attention_mask"][0].tolist()
        ('one two', [1, 1, 1, 1, 0])
    """

    def __init__(self, examples: Sequence[CaptionExample], tokenizer: Any, preprocessor: ImagePreprocessor,
                 batch_size: int, max_length: int = 64, seed: int = 0, shuffle: bool = True,
                 drop_remainder: bool = True, prompt: PromptArg = None, pairs: str = "all",
                 cache_images: bool = True):
        if pairs not in ("all", "sample"):
            raise InputError(f"pairs must be 'all' or 'sample'; got {pairs!r}")
        self.pairs, self.seed = pairs, seed
        items: list[tuple[int, str | None, str]] = []
        for i, ex in enumerate(examples):
            if not ex.captions:
                raise InputError(f"image {ex.image_id!r} has no captions")
            p = _resolve_prompt(prompt, ex)
            if pairs == "all":
                items.extend((i, p, c) for c in ex.captions)
            else:
                items.append((i, p, ""))
        super().__init__(examples, items, tokenizer, preprocessor, batch_size, max_length, seed, shuffle,
                         drop_remainder, cache_images)

    def _item(self, index: int, step: int) -> tuple[int, str | None, str]:
        i, p, c = self.items[index]
        if self.pairs == "sample":
            caps = self.examples[i].captions
            c = caps[int(np.random.default_rng([self.seed, 1, step, index]).integers(len(caps)))]
        return i, p, c


class VQABatches(_LMBatches):
    """VQA training batches: ``<bos> question: Q short answer: A <eos>``, A the most frequent answer.

    ``prompt`` is a template with ``{question}`` (default PETAL's Table 7 task instruction) or a function
    of the example. Other arguments as :class:`CaptionBatches`.

    Example:
        >>> import numpy as np
        >>> from vlpeft_jax.data.tokenizer import WordTokenizer
        >>> ex = [VQAExample("q1", "a", "is it red?", ("yes",) * 10, image=np.zeros((4, 4, 3), np.uint8))]
        >>> tok = WordTokenizer.train(["question: is it red? short answer: yes"])
        >>> b = VQABatches(ex, tok, ImagePreprocessor(size=4), 1, 12).batch(0)
        >>> tok.decode(b["input_ids"][0]), tok.decode(b["labels"][0][b["labels"][0] >= 0])
        ('question: is it red? short answer: yes', 'yes')
    """

    def __init__(self, examples: Sequence[VQAExample], tokenizer: Any, preprocessor: ImagePreprocessor,
                 batch_size: int, max_length: int = 64, seed: int = 0, shuffle: bool = True,
                 drop_remainder: bool = True, prompt: str | Callable[[Any], str] = VQA_PROMPT_TEMPLATE,
                 cache_images: bool = True):
        make = prompt if callable(prompt) else (lambda ex: prompt.format(question=ex.question))
        items = [(i, make(ex), ex.answer) for i, ex in enumerate(examples)]
        super().__init__(examples, items, tokenizer, preprocessor, batch_size, max_length, seed, shuffle,
                         drop_remainder, cache_images)


class EvalBatches:
    """Generation batches in dataset order: images + left-padded ``<bos> [prompt]``; last batch padded.

    ``prompt``: a string, a function of the example (e.g. ``vqa_prompt(template)``), or None for
    ``example.prompt`` (no prompt when that is unset) or, for :class:`VQAExample`, PETAL's
    ``"Question: {question} Short answer:"``. :meth:`examples_of` maps a batch back to its examples
    (references, answers, ids) for the metrics.

    Example:
        >>> import numpy as np
        >>> from vlpeft_jax.data.tokenizer import WordTokenizer
        >>> ex = [CaptionExample(str(i), ("x",), image=np.zeros((4, 4, 3), np.uint8)) for i in range(3)]
        >>> tok = WordTokenizer.train(["a photo of"])
        >>> batches = list(EvalBatches(ex, tok, ImagePreprocessor(size=4), 2, 5, prompt="a photo of"))
        >>> len(batches), batches[1]["example_index"].tolist(), batches[1]["valid"].tolist()
        (2, [2, -1], [True, False])
        >>> tok.decode(batches[0]["input_ids"][0])
        'a photo of'
    """

    def __init__(self, examples: Sequence[Example], tokenizer: Any, preprocessor: ImagePreprocessor,
                 batch_size: int, max_prompt_length: int = 16, prompt: PromptArg = None,
                 cache_images: bool = False):
        self.examples = examples
        self.codec = text_codec(tokenizer)
        self.batch_size, self.max_prompt_length = batch_size, max_prompt_length
        self.prompts = [_resolve_prompt(prompt, ex) for ex in examples]
        self.sampler = EpochSampler(len(examples), batch_size, shuffle=False, drop_remainder=False)
        self.images = _ImageSource(examples, preprocessor, cache_images)

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch

    def batch(self, k: int) -> dict[str, np.ndarray]:
        idx = self.sampler.indices(k)
        prompts = [self.prompts[i] if i >= 0 else None for i in idx]
        arrays = build_prompt_sequences(prompts, self.codec, self.max_prompt_length)
        example_index = idx.astype(np.int32)
        return {"pixel_values": self.images.pixel_values(example_index), **arrays,
                "example_index": example_index, "valid": example_index >= 0}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for k in range(len(self)):
            yield self.batch(k)

    def examples_of(self, batch: Mapping[str, np.ndarray]) -> list[Example]:
        """The examples of a batch's valid rows, in row order."""
        return [self.examples[int(i)] for i in np.asarray(batch["example_index"]) if i >= 0]


def vqa_prompt(template: str = VQA_PROMPT_TEMPLATE) -> Callable[[VQAExample], str]:
    """A prompt function for :class:`EvalBatches` over VQA examples.

    Example:
        >>> vqa_prompt()(VQAExample("1", "im", "what color?", ("red",)))
        'Question: what color? Short answer:'
    """
    return lambda ex: template.format(question=ex.question)
