"""Output containers shared by the backbones, and the calling conventions every backbone follows.

Decoders (GPT-2, LLaMA family) are called as::

    out = decoder.apply({"params": params}, input_ids, attention_mask,
                        inputs_embeds=None, position_ids=None, cache=None, decode=False)

- ``input_ids`` ``[b, t]`` int32, or ``inputs_embeds`` ``[b, t, d]`` instead (VLM compositions build
  these from ``decoder.embed_tokens`` plus visual tokens).
- ``attention_mask`` ``[b, t]`` (1 = real token; prompts are left-padded for generation).
- ``cache``: a :class:`~vlpeft_jax.models.layers.KVCache`; the new tokens are written at
  ``cache.index`` and ``out.cache`` is the updated cache. ``decode=True`` marks an incremental step
  (after the prefill), which hooks that add tokens (prompts) use to apply only once.
- The ``embed`` hook runs on the token embeddings, the ``final_hidden`` hook on the final hidden state
  and the ``lm_head`` hook on the LM head; positions are computed after the ``embed`` hook (from the
  possibly extended mask), as peft's prompt tuning does.

Encoders (ViT, CLIP vision, BERT/Q-Former) return :class:`EncoderOutput`.
"""

from __future__ import annotations

import flax
import jax

from vlpeft_jax.models.layers import KVCache


@flax.struct.dataclass
class DecoderOutput:
    """Decoder result.

    Attributes:
      logits: ``[b, t', vocab]`` where ``t' >= t`` if an ``embed`` hook added tokens.
      hidden_states: the embedding output and every layer's output, as Hugging Face returns them
        (``num_layers + 1`` entries; the last one after the final norm).
      attention_mask: ``[b, t']`` mask of the sequence actually processed (after hooks).
      cache: the updated cache, or None.
    """

    logits: jax.Array
    hidden_states: tuple[jax.Array, ...]
    attention_mask: jax.Array | None = None
    cache: KVCache | None = None


@flax.struct.dataclass
class EncoderOutput:
    """Encoder result.

    Attributes:
      last_hidden_state: ``[b, t, d]`` (after the final/post norm where the HF model applies one).
      hidden_states: the embedding output and every layer's output (HF ``output_hidden_states``).
      pooled: pooled output where the family defines one (CLIP: post-LN class token, then the
        projection if present; BERT: tanh pooler), else None.
    """

    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]
    pooled: jax.Array | None = None
