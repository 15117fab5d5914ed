"""Vision-language compositions: a prefix VLM (LLaVA / ClipCap) and a Q-Former VLM (BLIP-2 / InstructBLIP).

(a) :class:`PrefixVLM`: vision tower -> connector -> visual tokens placed in the language model's input,
    either prepended to the text or written over image placeholder tokens. The connector is KLAFT's
    Mapping Layer (seed ``000_a957fa63d822500b.txt``, Eq. 1): a linear map per token, an MLP with ``l``
    layers, or a small bidirectional Transformer with ``l`` layers (:class:`MappingLayer`).
(b) :class:`QFormerVLM`: frozen vision tower -> Q-Former over learned queries (optionally with the
    instruction tokens, as InstructBLIP) -> linear projection -> language model (seed
    ``001_e6226210b77e0466.txt`` §3.1).

Both take the language model's calling convention (``vlpeft_jax.models.outputs``) and add
``pixel_values`` (NHWC). For incremental decoding after the prefill, call them with
``pixel_values=None``: the step is then the plain language model on new token ids, with the cache.
Module names follow Hugging Face's LLaVA / BLIP-2 classes (``vision_tower``, ``multi_modal_projector``,
``language_model``; ``vision_model``, ``qformer``, ``language_projection``), so paths and PEFT target
patterns read the same as there.

Example:
    >>> import jax, jax.numpy as jnp
    >>> m = MappingLayer(ConnectorConfig(kind="mlp", num_layers=2), out_features=8)
    >>> p = m.init(jax.random.key(0), jnp.ones((1, 4, 6)))
    >>> m.apply(p, jnp.ones((1, 4, 6))).shape
    (1, 4, 8)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.models import hooks, layers
from vlpeft_jax.models.outputs import DecoderOutput

Array = jax.Array

CONNECTOR_KINDS = ("linear", "mlp", "transformer")
FEATURE_KINDS = ("patches", "cls", "all")


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    """Mapping Layer settings (seed 000, Eq. 1).

    Attributes:
      kind: ``linear`` (``h_{L,t} W_pf`` per token), ``mlp`` (``MLP_l``) or ``transformer`` (``Tra_l``).
      num_layers: ``l``, the MLP's linear layers or the Transformer's blocks.
      feature: which vision outputs become ``H_L``: ``patches`` (all patch tokens, LLaVA), ``cls`` (the
        class token, ClipCap) or ``all`` (class and patch tokens).
      vision_layer: which hidden state of the vision tower to use (-1 = last; LLaVA uses -2), or a tuple of
        them, whose selected tokens are concatenated along the features (LLaVA's list ``vision_feature_layer``).
      num_prefix: ``I_pf`` visual tokens when ``feature == "cls"`` (ClipCap maps one vector to ``I_pf``
        tokens); ignored otherwise (one visual token per selected vision token).
      hidden_features: MLP width (default: the LM width).
      num_heads: attention heads of the Transformer connector.
      activation: MLP activation.
      bias: biases on the connector's linear layers (LLaVA's ``multimodal_projector_bias``).
    """

    kind: str = "mlp"
    num_layers: int = 2
    feature: str = "patches"
    vision_layer: int | tuple[int, ...] = -1
    num_prefix: int = 1
    hidden_features: int | None = None
    num_heads: int = 4
    activation: str = "gelu"
    bias: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.vision_layer, int):  # a list from a config file: hashable, for jit
            object.__setattr__(self, "vision_layer", tuple(int(i) for i in self.vision_layer))
            if not self.vision_layer:
                raise ConfigError("connector.vision_layer is an empty list; give a layer index or a non-empty list")
        if self.kind not in CONNECTOR_KINDS:
            raise ConfigError(f"connector.kind={self.kind!r}; valid: {', '.join(CONNECTOR_KINDS)}")
        if self.feature not in FEATURE_KINDS:
            raise ConfigError(f"connector.feature={self.feature!r}; valid: {', '.join(FEATURE_KINDS)}")
        if self.num_layers < 1:
            raise ConfigError(f"connector.num_layers={self.num_layers}; must be >= 1")
        if self.num_prefix < 1:
            raise ConfigError(f"connector.num_prefix={self.num_prefix}; must be >= 1")
        if self.kind == "linear" and self.feature == "cls" and self.num_prefix > 1:
            raise ConfigError("connector.kind='linear' maps each vision token to one visual token; use 'mlp' or "
                              "'transformer' for num_prefix > 1 from the class token (seed 000 Eq. 1)")


class _ConnectorAttention(nn.Module):
    """Bidirectional multi-head self-attention of a connector block (``q/k/v/o_proj`` under ``self_attn``,
    so that methods targeting attention modules find their projections at the hook's path)."""

    num_heads: int

    @nn.compact
    def __call__(self, h: Array) -> Array:
        b, t, d = h.shape
        if d % self.num_heads:
            raise ConfigError(f"connector width {d} is not divisible by connector.num_heads={self.num_heads}")
        hd = d // self.num_heads
        q = layers.Linear(d, axes=("embed", "heads"), name="q_proj")(h).reshape(b, t, self.num_heads, hd)
        k = layers.Linear(d, axes=("embed", "heads"), name="k_proj")(h).reshape(b, t, self.num_heads, hd)
        v = layers.Linear(d, axes=("embed", "heads"), name="v_proj")(h).reshape(b, t, self.num_heads, hd)
        a = hooks.call("attention", self.path, layers.attention_default, q, k, v, None, inputs=h, module=self)
        return layers.Linear(d, axes=("heads", "embed"), name="o_proj")(a.reshape(b, t, d))


class _ConnectorMLP(nn.Module):
    """The feed-forward of a connector block (``fc1``/``fc2`` under ``mlp``; the ``mlp`` hook wraps it)."""

    activation: str

    @nn.compact
    def __call__(self, h: Array) -> Array:
        d = h.shape[-1]
        fc1 = layers.Linear(4 * d, axes=("embed", "mlp"), name="fc1")
        fc2 = layers.Linear(d, axes=("mlp", "embed"), name="fc2")
        act = layers.activation(self.activation)
        return hooks.call("mlp", self.path, lambda y: fc2(act(fc1(y))), h, module=self)


class _ConnectorBlock(nn.Module):
    """A bidirectional pre-LN Transformer block for the ``transformer`` Mapping Layer."""

    num_heads: int
    activation: str

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = x + _ConnectorAttention(self.num_heads, name="self_attn")(layers.LayerNorm(name="ln_1")(x))
        return x + _ConnectorMLP(self.activation, name="mlp")(layers.LayerNorm(name="ln_2")(x))


class MappingLayer(nn.Module):
    """KLAFT's Mapping Layer MaL (seed 000, Eq. 1): vision features ``H_L`` -> visual tokens ``H_I``.

    Input ``[b, n, d_pf]`` (already selected vision tokens), output ``[b, I_pf, d_h]``.
    """

    config: ConnectorConfig
    out_features: int

    @nn.compact
    def __call__(self, feats: Array) -> Array:
        c = self.config
        b = feats.shape[0]
        n_out = c.num_prefix if c.feature == "cls" else feats.shape[1]
        if c.kind == "linear":
            return layers.Linear(self.out_features, axes=(None, "embed"), use_bias=c.bias, name="linear_1")(feats)
        if c.kind == "mlp":
            act = layers.activation(c.activation)
            width = c.hidden_features or self.out_features
            x = feats
            for i in range(c.num_layers):
                last = i == c.num_layers - 1
                out = self.out_features * (n_out if c.feature == "cls" else 1) if last else width
                axes = (None if i == 0 else "mlp", "embed" if last else "mlp")
                x = layers.Linear(out, axes=axes, use_bias=c.bias, name=f"linear_{i + 1}")(x)
                if not last:
                    x = act(x)
            if c.feature == "cls":
                x = x.reshape(b, n_out, self.out_features)
            return x
        # transformer: project to the LM width, (ClipCap) append learned prefix constants, l blocks
        x = layers.Linear(self.out_features, axes=(None, "embed"), use_bias=c.bias, name="linear_in")(feats)
        if c.feature == "cls":
            const = self.param("prefix_const", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                              ("queries", "embed")),
                               (c.num_prefix, self.out_features))
            x = jnp.concatenate([x, jnp.broadcast_to(const[None].astype(x.dtype), (b,) + const.shape)], axis=1)
        for i in range(c.num_layers):
            x = _ConnectorBlock(c.num_heads, c.activation, name=f"layers_{i}")(x)
        return x[:, -n_out:] if c.feature == "cls" else x


def select_vision_features(out: Any, feature: str, vision_layer: int | tuple[int, ...]) -> Array:
    """``H_L`` from a vision tower's :class:`EncoderOutput`: a hidden state, then class/patch tokens.

    ``hidden_states[i]`` follows transformers (0: the embedding output, ``i``: the output of layer ``i``;
    for CLIP, -2 is the second-to-last layer's output, before ``post_layernorm``). Several layers (a tuple)
    are each selected, then concatenated along the features, as LLaVA does for a list
    ``vision_feature_layer``.
    """
    if not isinstance(vision_layer, int):
        return jnp.concatenate([select_vision_features(out, feature, i) for i in vision_layer], axis=-1)
    h = out.last_hidden_state if vision_layer == -1 else out.hidden_states[vision_layer]
    if feature == "cls":
        return h[:, :1]
    if feature == "patches":
        return h[:, 1:]
    return h


def place_visual_tokens(text_embeds: Array, attention_mask: Array | None, visual: Array,
                        input_ids: Array, image_token_id: int | None) -> tuple[Array, Array]:
    """Puts visual tokens into the LM input: prepended (``image_token_id`` None) or over placeholders.

    With placeholders, the visual tokens of all images ``visual`` ``[n_images, n, d]``, in order, fill the
    placeholders of the batch in reading order (row by row), as transformers' LLaVA does
    (``masked_scatter``): with one image per row, each row must hold ``n`` placeholders; a row may also hold
    several images' (then ``n_images`` exceeds the batch). The counts cannot be checked inside ``jit``;
    :func:`check_placeholders` checks them on concrete ids (:class:`PrefixVLM` does so when not traced).
    """
    b, t, _ = text_embeds.shape
    mask = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
    if image_token_id is None:
        embeds = jnp.concatenate([visual.astype(text_embeds.dtype), text_embeds], axis=1)
        mask = jnp.concatenate([jnp.ones(visual.shape[:2], jnp.int32), mask], axis=1)
        return embeds, mask
    is_img = input_ids == image_token_id
    flat = visual.reshape(-1, visual.shape[-1])
    slot = jnp.clip(jnp.cumsum(is_img.reshape(-1)) - 1, 0, flat.shape[0] - 1).reshape(b, t)
    gathered = jnp.take(flat, slot, axis=0).astype(text_embeds.dtype)
    return jnp.where(is_img[..., None], gathered, text_embeds), mask


class ImageTokenError(InputError, ConfigError):
    """The image placeholder tokens of ``input_ids`` do not match the visual tokens of the images.

    An :class:`~vlpeft_jax.errors.InputError`; also a ``ConfigError`` for callers that caught that before.
    """


def check_placeholders(input_ids: Any, image_token_id: int, num_visual: int, num_images: int | None = None) -> None:
    """Raises :class:`ImageTokenError` unless the placeholders fit ``num_visual`` visual tokens per image.

    ``num_images`` None (one image per row): every row holds exactly ``num_visual`` placeholders
    ``image_token_id``. Otherwise the batch holds ``num_images * num_visual`` of them, a multiple of
    ``num_visual`` per row (a row's images follow each other in the ``pixel_values`` order).

    Example:
        >>> check_placeholders([[7, 9, 9, 1], [9, 9, 2, 3]], image_token_id=9, num_visual=2)
        >>> try:
        ...     check_placeholders([[7, 9, 9, 1], [9, 2, 2, 3]], image_token_id=9, num_visual=2)
        ... except ImageTokenError as e:
        ...     print(str(e)[:46])
        rows [1] hold [1] image placeholder tokens (id
    """
    import numpy as np

    counts = (np.asarray(input_ids) == image_token_id).sum(-1)
    if num_images is None:
        bad = np.nonzero(counts != num_visual)[0]
        if bad.size:
            raise ImageTokenError(f"rows {bad.tolist()[:10]} hold {counts[bad].tolist()[:10]} image placeholder "
                                  f"tokens (id {image_token_id}); each must hold exactly {num_visual}, one per "
                                  "visual token of its image")
        return
    bad = np.nonzero(counts % num_visual)[0]
    if bad.size or counts.sum() != num_images * num_visual:
        raise ImageTokenError(f"input_ids hold {counts.tolist()[:10]} image placeholder tokens (id {image_token_id}) "
                              f"per row, {int(counts.sum())} in all; {num_images} image(s) of {num_visual} visual "
                              f"tokens need {num_images * num_visual} in all, a multiple of {num_visual} per row")


class PrefixVLM(nn.Module):
    """Vision tower -> Mapping Layer -> decoder LM (LLaVA / ClipCap; seed 000 Eq. 1, seed 003).

    Attributes:
      vision_tower: a vision encoder returning :class:`EncoderOutput` from NHWC ``pixel_values``.
      language_model: a decoder following the convention of ``vlpeft_jax.models.outputs``.
      connector: the Mapping Layer settings.
      lm_width: the LM's embedding width.
      image_token_id: None to prepend the visual tokens; else the placeholder token id, which
        ``input_ids`` repeat :attr:`num_image_tokens` times per image (transformers' LLaVA layout;
        concrete ids are checked by :func:`check_placeholders`, traced ones cannot be).
    """

    vision_tower: nn.Module
    language_model: nn.Module
    connector: ConnectorConfig
    lm_width: int
    image_token_id: int | None = None

    def setup(self) -> None:
        self.multi_modal_projector = MappingLayer(self.connector, self.lm_width)

    def encode_image(self, pixel_values: Array) -> Array:
        """Visual tokens ``H_I`` ``[b, I_pf, d_h]``."""
        out = self.vision_tower(pixel_values)
        feats = select_vision_features(out, self.connector.feature, self.connector.vision_layer)
        return self.multi_modal_projector(feats)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None, pixel_values: Array | None = None,
                 *, cache: layers.KVCache | None = None, decode: bool = False, logits_to_keep: int = 0
                 ) -> DecoderOutput:
        if pixel_values is None:
            return self.language_model(input_ids, attention_mask, cache=cache, decode=decode,
                                       logits_to_keep=logits_to_keep)
        # concrete ids are checked here (not at init, whose example ids hold no placeholders)
        if (self.image_token_id is not None and not isinstance(input_ids, jax.core.Tracer)
                and not self.is_initializing()):
            check_placeholders(input_ids, self.image_token_id, self.num_image_tokens,
                               None if pixel_values.shape[0] == input_ids.shape[0] else pixel_values.shape[0])
        visual = self.encode_image(pixel_values)
        text = self.language_model.embed_tokens(input_ids)
        embeds, mask = place_visual_tokens(text, attention_mask, visual, input_ids, self.image_token_id)
        return self.language_model(None, mask, inputs_embeds=embeds, cache=cache, decode=decode,
                                   logits_to_keep=logits_to_keep)

    def num_visual_tokens(self, num_vision_tokens: int) -> int:
        """``I_pf`` for a vision tower that outputs ``num_vision_tokens`` tokens (class token included)."""
        c = self.connector
        return {"cls": c.num_prefix, "patches": num_vision_tokens - 1, "all": num_vision_tokens}[c.feature]

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image (the placeholders one image needs), for a tower with a class token and a
        fixed patch grid (``vision_tower.config.num_patches``: CLIP, ViT); LLaVA's ``image_seq_length``."""
        return self.num_visual_tokens(self.vision_tower.config.num_patches + 1)


class QFormerVLM(nn.Module):
    """Vision tower -> Q-Former -> linear -> language model (BLIP-2 / InstructBLIP; seed 001 §3.1).

    The image goes through ``vision_model`` (its ``last_hidden_state``, post-normed in BLIP-2's tower, is what
    the Q-Former cross-attends to); the Q-Former's ``num_query_tokens`` query outputs are projected by
    ``language_projection`` to the LM width and become the visual tokens. InstructBLIP also feeds the
    instruction to the Q-Former (``qformer_input_ids`` / ``qformer_attention_mask``, transformers' names, in the
    Q-Former's own vocabulary); it reaches the LM as ordinary text in ``input_ids``.

    Where the visual tokens go, as transformers 5.24 ``Blip2ForConditionalGeneration`` /
    ``InstructBlipForConditionalGeneration`` do it:

    - ``image_token_id`` set (the checkpoint's ``image_token_index``): each row of ``input_ids`` holds
      ``num_query_tokens`` placeholders, and the i-th placeholder's embedding is replaced by the i-th visual
      token (``masked_scatter``); the attention mask is the caller's, unchanged, so the placeholders are
      ordinary positions, numbered from the mask like text (as transformers' ``generate`` numbers them; its LLaMA
      *forward* numbers ``0..t-1`` instead, which differs only where padding sits inside a row).
    - ``image_token_id`` None (checkpoints written before the processor inserted placeholders): the visual
      tokens are prepended with a mask of ones, as transformers 4.x did; the logits then cover them too.

    A decoder LM gets the embeddings as ``inputs_embeds``. An encoder-decoder LM (Flan-T5; ``is_encoder_decoder``)
    gets them as its *encoder* input, and ``decoder_input_ids`` / ``decoder_attention_mask`` pass through to its
    decoder (None: one decoder start token per row, the generation prefill); its logits are the decoder's.
    After the prefill, call with ``pixel_values=None``: the step is the plain language model with the cache (a
    decoder on new ``input_ids``; an encoder-decoder on ``decoder_input_ids`` against its cached encoder output,
    as :class:`~vlpeft_jax.eval.decode.ModuleApply` calls it).

    Attributes:
      vision_model: e.g. :class:`~vlpeft_jax.models.blip_vision.BlipVisionModel`.
      qformer: a :class:`~vlpeft_jax.models.bert.QFormer` (its learned ``query_tokens`` live under it).
      language_model: a decoder following :mod:`vlpeft_jax.models.outputs` with ``embed_tokens``, or an
        encoder-decoder such as :class:`~vlpeft_jax.models.t5.T5ForConditionalGeneration`.
      lm_width: width of the LM's input embeddings (``language_projection``'s output).
      num_query_tokens: visual tokens per image.
      image_token_id: the placeholder id, or None to prepend.

    Example:
        >>> from vlpeft_jax.models.bert import BertConfig, QFormer
        >>> from vlpeft_jax.models.blip_vision import BlipVisionConfig, BlipVisionModel
        >>> from vlpeft_jax.models.opt import OPTConfig, OPTForCausalLM
        >>> vlm = QFormerVLM(
        ...     BlipVisionModel(BlipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                                      num_attention_heads=2, image_size=16, patch_size=8)),
        ...     QFormer(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        ...                        intermediate_size=32, cross_attention_frequency=1, encoder_hidden_size=16,
        ...                        num_query_tokens=2)),
        ...     OPTForCausalLM(OPTConfig(vocab_size=20, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
        ...                              num_attention_heads=2)),
        ...     lm_width=16, num_query_tokens=2, image_token_id=19)
        >>> ids = jnp.array([[19, 19, 2, 5, 6]])  # two placeholders, then the text
        >>> init = lambda: vlm.init_with_output(jax.random.key(0), ids, None, jnp.zeros((1, 16, 16, 3)))[0]
        >>> jax.eval_shape(init).logits.shape, vlm.is_encoder_decoder
        ((1, 5, 20), False)
    """

    vision_model: nn.Module
    qformer: nn.Module
    language_model: nn.Module
    lm_width: int
    num_query_tokens: int
    image_token_id: int | None = None

    @property
    def is_encoder_decoder(self) -> bool:
        """Whether the language model is an encoder-decoder (the visual tokens then go to its encoder)."""
        return bool(getattr(self.language_model, "is_encoder_decoder", False))

    def setup(self) -> None:
        # computed in the LM's dtype, as transformers casts the (float32) Q-Former output to it first
        lm_dtype = getattr(getattr(self.language_model, "config", None), "dtype", jnp.float32)
        self.language_projection = layers.Linear(self.lm_width, axes=(None, "embed"), dtype=lm_dtype)

    def encode_image(self, pixel_values: Array, qformer_input_ids: Array | None = None,
                     qformer_attention_mask: Array | None = None) -> Array:
        """The visual tokens ``[b, num_query_tokens, lm_width]``."""
        image = self.vision_model(pixel_values).last_hidden_state
        if qformer_input_ids is None:
            if qformer_attention_mask is not None:
                raise InputError("qformer_attention_mask was given without qformer_input_ids")
            q = self.qformer(encoder_hidden_states=image)
        else:
            q = self.qformer(encoder_hidden_states=image, input_ids=qformer_input_ids,
                             attention_mask=qformer_attention_mask)
        return self.language_projection(q.last_hidden_state[:, : self.num_query_tokens])

    def __call__(self, input_ids: Array | None = None, attention_mask: Array | None = None,
                 pixel_values: Array | None = None, *, qformer_input_ids: Array | None = None,
                 qformer_attention_mask: Array | None = None, decoder_input_ids: Array | None = None,
                 decoder_attention_mask: Array | None = None, cache: Any = None, decode: bool = False,
                 logits_to_keep: int = 0) -> DecoderOutput:
        seq2seq = {}
        if self.is_encoder_decoder:
            seq2seq = {"decoder_input_ids": decoder_input_ids, "decoder_attention_mask": decoder_attention_mask}
        elif decoder_input_ids is not None or decoder_attention_mask is not None:
            raise InputError("decoder_input_ids / decoder_attention_mask were given, but the language model is a "
                             f"decoder ({type(self.language_model).__name__}), not an encoder-decoder")
        if pixel_values is None:
            return self.language_model(input_ids, attention_mask, **seq2seq, cache=cache, decode=decode,
                                       logits_to_keep=logits_to_keep)
        if input_ids is None:
            raise InputError("QFormerVLM needs input_ids with pixel_values (the prompt, placeholders included)")
        if self.image_token_id is not None and not isinstance(input_ids, jax.core.Tracer):
            check_placeholders(input_ids, self.image_token_id, self.num_query_tokens)  # eager calls only
        visual = self.encode_image(pixel_values, qformer_input_ids, qformer_attention_mask)
        text = self.language_model.embed_tokens(input_ids)
        embeds, mask = place_visual_tokens(text, attention_mask, visual, input_ids, self.image_token_id)
        return self.language_model(None, mask, **seq2seq, inputs_embeds=embeds, cache=cache, decode=decode,
                                   logits_to_keep=logits_to_keep)
