"""Parity of BLIP-2 / InstructBLIP checkpoints (``hf.blip2`` + ``QFormerVLM``) with transformers.

Tiny random ``Blip2ForConditionalGeneration`` (OPT LM) and ``InstructBlipForConditionalGeneration`` (LLaMA LM)
models are built with transformers inside the tests (fp32, ``torch.manual_seed``; every weight redrawn with
std 0.2, norms around 1, the learned query tokens random instead of transformers' zeros, so that no part is
trivially small), saved with ``save_pretrained``, loaded with ``load_blip2`` / ``load_instructblip`` and
compared on a left-padded batch of three different images whose prompts hold the ``image_token_index``
placeholders (as the 5.x processors write them): the vision tower's outputs, the logits at every real
position, greedy tokens against ``generate``, and beam search's ``sequences_scores``. Run with ``-s`` to see
the measured max abs differences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tests.max_diffs import MaxDiffs
from vlpeft_jax.errors import CheckpointError, ConfigError, InputError
from vlpeft_jax.eval import decode
from vlpeft_jax.hf import blip2, io
from vlpeft_jax.models import hooks
from vlpeft_jax.models.blip_vision import BlipVisionModel

jax.config.update("jax_default_matmul_precision", "highest")

TOL = 1e-4
VOCAB = 64
IMAGE_TOKEN = VOCAB - 1
NUM_QUERY = 4
PAD, BOS, EOS = 1, 2, 3
# the end token for generation: one each tiny model produces, so that rows finish at different steps
GEN_EOS = {("blip-2", "opt"): 23, ("instructblip", "llama"): 23, ("blip-2", "t5"): 56, ("instructblip", "t5"): 49}
BATCH, TEXT_LEN = 3, 6
NEW_TOKENS, NUM_BEAMS = 5, 3

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=16,
              patch_size=8)
QFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=50,
               max_position_embeddings=32, cross_attention_frequency=2)  # layer 0 cross-attends, layer 1 does not
TEXT = {
    "opt": dict(model_type="opt", vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS,
                eos_token_id=EOS),
    "llama": dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD,
                  bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False),
    # Flan-T5 shape: gated-GELU feed-forward, untied head; pad 0 = decoder start, eos 1
    "t5": dict(model_type="t5", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
               tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
}
DECODER_LEN = 4  # decoder_input_ids of the encoder-decoder compositions' logits test

MAX_DIFFS = MaxDiffs("BLIP-2 / InstructBLIP max abs diff vs transformers (fp32)")
report_max_diffs = MAX_DIFFS.fixture()
record = MAX_DIFFS.record


class Composition:
    """A saved tiny transformers VLM, our loaded module and params, and a jitted forward."""

    def __init__(self, kind: str, lm: str, tmp_dir):
        torch.manual_seed(0)
        if kind == "blip-2":
            config = transformers.Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=TEXT[lm],
                                              num_query_tokens=NUM_QUERY, image_token_index=IMAGE_TOKEN)
            self.hf = transformers.Blip2ForConditionalGeneration(config)
            self.load = blip2.load_blip2
        else:
            config = transformers.InstructBlipConfig(vision_config=VISION, qformer_config=QFORMER,
                                                     text_config=TEXT[lm], num_query_tokens=NUM_QUERY,
                                                     image_token_index=IMAGE_TOKEN)
            self.hf = transformers.InstructBlipForConditionalGeneration(config)
            self.load = blip2.load_instructblip
        self.hf.eval()
        with torch.no_grad():
            for name, p in self.hf.named_parameters():
                if "norm" in name and name.endswith("weight"):
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                elif name.startswith("language_model") and ("embed_" in name or "shared" in name):  # varied tokens
                    p.copy_(torch.randn_like(p))
                else:
                    p.copy_(0.2 * torch.randn_like(p))
        self.name = f"{kind}+{lm}"
        self.kind = kind
        self.seq2seq = lm == "t5"
        self.dir = tmp_dir / self.name
        self.hf.save_pretrained(self.dir)
        self.model, params = self.load(self.dir)
        self.params = jax.tree.map(jnp.asarray, params)
        self.step = decode.ModuleApply(self.model)
        self.forward = jax.jit(lambda p, inputs, mask: self.model.apply({"params": p}, attention_mask=mask, **inputs))

    def hf_inputs(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out = {"input_ids": torch.tensor(batch["input_ids"]).long(),
               "attention_mask": torch.tensor(batch["attention_mask"]).long(),
               "pixel_values": torch.tensor(batch["pixel_values"].transpose(0, 3, 1, 2))}
        if self.kind == "instructblip":
            out["qformer_input_ids"] = torch.tensor(batch["qformer_input_ids"]).long()
            out["qformer_attention_mask"] = torch.tensor(batch["qformer_attention_mask"]).long()
        if self.seq2seq and "decoder_input_ids" in batch:
            out["decoder_input_ids"] = torch.tensor(batch["decoder_input_ids"]).long()
        return out

    def our_inputs(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        keys = ["input_ids", "pixel_values"]
        if self.kind == "instructblip":
            keys += ["qformer_input_ids", "qformer_attention_mask"]
        if self.seq2seq and "decoder_input_ids" in batch:
            keys.append("decoder_input_ids")
        return {k: jnp.asarray(batch[k]) for k in keys}


@pytest.fixture(scope="module")
def compositions(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blip2")
    cache: dict[tuple[str, str], Composition] = {}

    def get(kind: str, lm: str) -> Composition:
        if (kind, lm) not in cache:
            cache[kind, lm] = Composition(kind, lm, tmp)
        return cache[kind, lm]

    return get


@pytest.fixture(scope="module")
def batch() -> dict[str, np.ndarray]:
    """Three images; left-padded prompts ``[pad..] [image x NUM_QUERY] [bos] text`` with 6, 4 and 2 text tokens;
    right-padded Q-Former instructions of 5, 3 and 4 tokens."""
    rng = np.random.default_rng(0)
    length = NUM_QUERY + TEXT_LEN
    ids = np.full((BATCH, length), PAD, np.int32)
    mask = np.zeros((BATCH, length), np.int32)
    for row, n_text in enumerate((TEXT_LEN, TEXT_LEN - 2, TEXT_LEN - 4)):
        start = length - NUM_QUERY - n_text
        ids[row, start:start + NUM_QUERY] = IMAGE_TOKEN
        ids[row, start + NUM_QUERY] = BOS
        ids[row, start + NUM_QUERY + 1:] = rng.integers(4, IMAGE_TOKEN, size=n_text - 1)
        mask[row, start:] = 1
    q_ids = rng.integers(1, QFORMER["vocab_size"], size=(BATCH, 5)).astype(np.int32)
    q_mask = (np.arange(5)[None] < np.array([5, 3, 4])[:, None]).astype(np.int32)
    pixels = rng.normal(size=(BATCH, 16, 16, 3)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
            "qformer_input_ids": np.where(q_mask == 1, q_ids, 0).astype(np.int32), "qformer_attention_mask": q_mask}


CASES = [("blip-2", "opt"), ("instructblip", "llama"), ("blip-2", "t5"), ("instructblip", "t5")]


# --------------------------------------------------------------------------------------------------
# Forward parity


def test_vision_tower_matches_transformers(compositions, batch):
    """Our BlipVisionModel on the checkpoint's vision weights: last_hidden_state (post-LN, what the Q-Former
    reads), every hidden state and the pooled output."""
    comp = compositions("blip-2", "opt")
    tower = BlipVisionModel(comp.model.vision_model.config)
    out = jax.jit(lambda p, x: tower.apply({"params": p}, x))(comp.params["vision_model"],
                                                                 jnp.asarray(batch["pixel_values"]))
    with torch.no_grad():
        ref = comp.hf.vision_model(torch.tensor(batch["pixel_values"].transpose(0, 3, 1, 2)),
                                   output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == VISION["num_hidden_layers"] + 1
    diffs = [np.abs(np.asarray(out.last_hidden_state) - ref.last_hidden_state.numpy()).max(),
             np.abs(np.asarray(out.pooled) - ref.pooler_output.numpy()).max(),
             *(np.abs(np.asarray(a) - b.numpy()).max() for a, b in zip(out.hidden_states, ref.hidden_states,
                                                                      strict=True))]
    assert record("vision tower (all outputs)", max(diffs)) <= TOL, diffs


@pytest.mark.parametrize("kind,lm", CASES)
def test_logits_match_transformers(compositions, batch, kind, lm):
    """Logits at every real position of a left-padded batch of three images (placeholders and text); for Flan-T5
    the decoder's logits on ``decoder_input_ids`` given with the (image + prompt) encoder input."""
    comp = compositions(kind, lm)
    if comp.seq2seq:
        batch = dict(batch, decoder_input_ids=np.random.default_rng(1).integers(0, VOCAB, (BATCH, DECODER_LEN)))
    with torch.no_grad():
        ref = comp.hf(**comp.hf_inputs(batch)).logits.numpy()
    out = comp.forward(comp.params, comp.our_inputs(batch), jnp.asarray(batch["attention_mask"]))
    assert out.logits.shape == ref.shape == (BATCH, DECODER_LEN if comp.seq2seq else NUM_QUERY + TEXT_LEN, VOCAB)
    real = np.ones(ref.shape[:2], bool) if comp.seq2seq else batch["attention_mask"].astype(bool)
    diff = record(f"{comp.name} logits", np.abs(np.asarray(out.logits) - ref)[real].max())
    assert diff <= TOL, diff
    # the image matters (a wrong placement or a skipped vision tower would not show otherwise)
    other = dict(batch, pixel_values=batch["pixel_values"][::-1].copy())
    moved = comp.forward(comp.params, comp.our_inputs(other), jnp.asarray(batch["attention_mask"]))
    assert np.abs(np.asarray(moved.logits) - np.asarray(out.logits))[real].max() > 1e-2


def test_instruction_reaches_the_qformer(compositions, batch):
    """InstructBLIP: a different Q-Former instruction changes the logits, as in transformers."""
    comp = compositions("instructblip", "llama")
    other = dict(batch, qformer_input_ids=batch["qformer_input_ids"][::-1].copy(),
                 qformer_attention_mask=batch["qformer_attention_mask"][::-1].copy())
    with torch.no_grad():
        ref = comp.hf(**comp.hf_inputs(other)).logits.numpy()
    out = comp.forward(comp.params, comp.our_inputs(other), jnp.asarray(batch["attention_mask"]))
    real = batch["attention_mask"].astype(bool)
    assert record(f"{comp.name} logits", np.abs(np.asarray(out.logits) - ref)[real].max()) <= TOL
    base = comp.forward(comp.params, comp.our_inputs(batch), jnp.asarray(batch["attention_mask"]))
    assert np.abs(np.asarray(base.logits) - np.asarray(out.logits))[real].max() > 1e-2


def test_prepended_queries_match_the_transformers_4_layout(compositions, batch):
    """``image_token_id`` None (configs without ``image_token_index``): the visual tokens are prepended with a
    mask of ones, as transformers 4.x did. Reference: transformers' own image features (``get_image_features``)
    concatenated before its token embeddings, fed to its language model."""
    comp = compositions("blip-2", "opt")
    model = comp.model.clone(image_token_id=None)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    text = [row[(m == 1) & (row != IMAGE_TOKEN)] for row, m in zip(ids, mask, strict=True)]
    text_ids = np.full((BATCH, TEXT_LEN), PAD, np.int32)
    text_mask = np.zeros((BATCH, TEXT_LEN), np.int32)
    for row, tokens in enumerate(text):
        text_ids[row, TEXT_LEN - len(tokens):], text_mask[row, TEXT_LEN - len(tokens):] = tokens, 1
    with torch.no_grad():
        visual = comp.hf.get_image_features(torch.tensor(batch["pixel_values"].transpose(0, 3, 1, 2))).pooler_output
        embeds = torch.cat([visual, comp.hf.get_input_embeddings()(torch.tensor(text_ids).long())], dim=1)
        full_mask = torch.cat([torch.ones(BATCH, NUM_QUERY).long(), torch.tensor(text_mask).long()], dim=1)
        ref = comp.hf.language_model(inputs_embeds=embeds, attention_mask=full_mask).logits.numpy()
    out = jax.jit(lambda p, i, m, x: model.apply({"params": p}, i, m, x))(
        comp.params, jnp.asarray(text_ids), jnp.asarray(text_mask), jnp.asarray(batch["pixel_values"]))
    assert out.logits.shape == ref.shape == (BATCH, NUM_QUERY + TEXT_LEN, VOCAB)
    diff = record("blip-2+opt logits, queries prepended", np.abs(np.asarray(out.logits) - ref)[full_mask.bool()].max())
    assert diff <= TOL, diff


def test_placeholder_count_is_checked_on_concrete_ids(compositions, batch):
    comp = compositions("blip-2", "opt")
    ids = batch["input_ids"].copy()
    ids[1, np.argmax(ids[1] == IMAGE_TOKEN)] = 5  # row 1 keeps 3 of its 4 placeholders
    with pytest.raises(InputError, match=r"rows \[1\] hold \[3\] image placeholder"):
        comp.model.apply({"params": comp.params}, jnp.asarray(ids), jnp.asarray(batch["attention_mask"]),
                         jnp.asarray(batch["pixel_values"]))


def test_hook_points_sit_at_transformers_module_paths(compositions, batch):
    """Every ``linear`` hook point is a module of the key map (so its HF name is the mapped key), and the
    vision tower's, Q-Former's and LM's attention / feed-forward hook points are where transformers has them."""
    comp = compositions("instructblip", "llama")
    seen: dict[str, set[str]] = {kind: set() for kind in ("linear", "attention", "mlp", "embed")}

    def record_path(ctx, nxt, *args):
        seen[ctx.kind].add(ctx.name)
        return nxt(*args)

    with hooks.use_hooks(*(hooks.Hook(kind, record_path) for kind in seen)):
        jax.eval_shape(lambda p: comp.model.apply({"params": p}, attention_mask=jnp.asarray(batch["attention_mask"]),
                                                  **comp.our_inputs(batch)), comp.params)
    hf_modules = {m.path.rsplit("/", 1)[0]: m.hf_key.rsplit(".", 1)[0]
                  for m in blip2.instructblip_key_maps(blip2.Blip2Config.from_module(comp.model))
                  if m.path.endswith("/kernel")}
    assert seen["linear"] <= set(hf_modules), seen["linear"] - set(hf_modules)
    assert hf_modules["vision_model/encoder/layers_0/self_attn/qkv"] == "vision_model.encoder.layers.0.self_attn.qkv"
    assert {"vision_model/embeddings/patch_embedding", "language_projection",
            "qformer/encoder/layer_0/crossattention/attention/key"} <= seen["linear"]
    assert {"vision_model/encoder/layers_0/self_attn", "qformer/encoder/layer_0/attention/attention",
            "qformer/encoder/layer_0/crossattention/attention", "language_model/model/layers_1/self_attn"
            } <= seen["attention"]
    assert {"vision_model/encoder/layers_0/mlp", "qformer/encoder/layer_1/intermediate_query",
            "qformer/encoder/layer_1/intermediate", "language_model/model/layers_0/mlp"} <= seen["mlp"]
    assert "vision_model/embeddings" in seen["embed"]


# --------------------------------------------------------------------------------------------------
# Generation parity


@pytest.mark.parametrize("kind,lm", CASES)
def test_greedy_and_beam_match_generate(compositions, batch, kind, lm):
    """Greedy tokens equal transformers' ``generate``; beam search's tokens and ``sequences_scores`` too."""
    comp = compositions(kind, lm)
    mask = jnp.asarray(batch["attention_mask"])
    settings = dict(max_new_tokens=NEW_TOKENS, eos_token_id=GEN_EOS[kind, lm], pad_token_id=PAD)
    # transformers returns the prompt before the new tokens (decoder LMs) or the decoder start token (T5)
    prompt_len = 1 if comp.seq2seq else batch["input_ids"].shape[1]
    with torch.no_grad():
        ref_greedy = comp.hf.generate(**comp.hf_inputs(batch), do_sample=False, num_beams=1, **settings)
        ref_beam = comp.hf.generate(**comp.hf_inputs(batch), do_sample=False, num_beams=NUM_BEAMS,
                                    length_penalty=1.0, early_stopping=False, output_scores=True,
                                    return_dict_in_generate=True, **settings)
    greedy = decode.generate(comp.step, comp.params, comp.our_inputs(batch), mask, **settings)
    beam = decode.generate(comp.step, comp.params, comp.our_inputs(batch), mask, method="beam",
                           num_beams=NUM_BEAMS, length_penalty=1.0, early_stopping=False, **settings)
    print(f"{comp.name} greedy {np.asarray(greedy.sequences).tolist()} beam {np.asarray(beam.sequences).tolist()}")
    assert (np.asarray(greedy.lengths) < NEW_TOKENS).any() or (np.asarray(beam.lengths) < NEW_TOKENS).any()
    _assert_tokens_equal(np.asarray(greedy.sequences), ref_greedy[:, prompt_len:].numpy())
    _assert_tokens_equal(np.asarray(beam.sequences), ref_beam.sequences[:, prompt_len:].numpy())
    diff = record(f"{comp.name} beam sequences_scores",
                  np.abs(np.asarray(beam.scores) - ref_beam.sequences_scores.numpy()).max())
    assert diff <= TOL, diff


@pytest.mark.parametrize("kind,lm", [("blip-2", "opt"), ("instructblip", "llama")])
def test_processor_layout_matches_transformers(compositions, batch, kind, lm):
    """The layout the 5.x processors write with left padding: ``[image x NUM_QUERY] [pad..] [bos] text`` (the
    placeholders are put before the padded text). Greedy tokens equal ``generate``; OPT's logits equal the forward.

    LLaMA's logits are compared on the other layout only: transformers' LLaMA *forward* numbers positions
    ``0..t-1`` whatever the mask, its ``generate`` from the mask (``cumsum - 1``), so with padding between the
    placeholders and the text the two disagree; our decoders follow ``generate`` (see ``gpt2.attention_layout``).
    """
    comp = compositions(kind, lm)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    length = ids.shape[1]
    layout_ids = np.full_like(ids, PAD)
    layout_mask = np.zeros_like(mask)
    for row in range(BATCH):
        text = ids[row][(mask[row] == 1) & (ids[row] != IMAGE_TOKEN)]
        layout_ids[row, :NUM_QUERY], layout_mask[row, :NUM_QUERY] = IMAGE_TOKEN, 1
        layout_ids[row, length - len(text):], layout_mask[row, length - len(text):] = text, 1
    assert (layout_mask == 0).any()  # padding sits between the placeholders and the text
    layout = dict(batch, input_ids=layout_ids, attention_mask=layout_mask)
    settings = dict(max_new_tokens=NEW_TOKENS, eos_token_id=GEN_EOS[kind, lm], pad_token_id=PAD)
    with torch.no_grad():
        ref = comp.hf.generate(**comp.hf_inputs(layout), do_sample=False, num_beams=1, **settings)
        ref_logits = comp.hf(**comp.hf_inputs(layout)).logits.numpy()
    greedy = decode.generate(comp.step, comp.params, comp.our_inputs(layout), jnp.asarray(layout_mask), **settings)
    _assert_tokens_equal(np.asarray(greedy.sequences), ref[:, length:].numpy())
    if lm == "opt":
        out = comp.forward(comp.params, comp.our_inputs(layout), jnp.asarray(layout_mask))
        real = layout_mask.astype(bool)
        diff = record(f"{comp.name} logits, processor layout", np.abs(np.asarray(out.logits) - ref_logits)[real].max())
        assert diff <= TOL, diff


def _assert_tokens_equal(ours: np.ndarray, ref: np.ndarray) -> None:
    """transformers stops at the longest finished row; ours runs on with padding."""
    np.testing.assert_array_equal(ours[:, : ref.shape[1]], ref)
    assert (ours[:, ref.shape[1]:] == PAD).all()


# --------------------------------------------------------------------------------------------------
# Checkpoint IO


@pytest.mark.parametrize("kind,lm", CASES)
def test_tree_mirrors_hf_names_and_exports_back(compositions, kind, lm):
    """Every saved tensor is mapped, and ``*_to_hf_state_dict`` gives the saved state dict back exactly."""
    comp = compositions(kind, lm)
    saved = io.load_state_dict(comp.dir)
    export = blip2.blip2_to_hf_state_dict if kind == "blip-2" else blip2.instructblip_to_hf_state_dict
    config = blip2.Blip2Config.from_module(comp.model)
    assert config == blip2.Blip2Config.from_hf(io.load_config(comp.dir), state=saved)
    exported = export(comp.params, config)
    assert set(exported) == set(saved)
    for key, value in saved.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    assert comp.model.image_token_id == IMAGE_TOKEN and comp.model.num_query_tokens == NUM_QUERY
    assert comp.model.is_encoder_decoder is comp.seq2seq
    assert set(comp.params) == {"vision_model", "qformer", "language_model", "language_projection"}


def test_lora_export_loads_in_peft_onto_the_transformers_vlm(compositions, batch, tmp_path):
    """LoRA on the vision tower's fused ``qkv``, the Q-Former's ``query``/``value`` and the LM's ``q_proj``/``v_proj``,
    exported with the module names of our key map, loads with ``PeftModel.from_pretrained`` onto the transformers
    BLIP-2 and gives our logits."""
    import peft

    from vlpeft_jax.hf import peft_io
    from vlpeft_jax.peft import base as pb
    from vlpeft_jax.peft.lora import LoRA

    comp = compositions("blip-2", "opt")
    config = blip2.Blip2Config.from_module(comp.model)
    method = LoRA(targets=("qkv", "query", "value", "q_proj", "v_proj"), rank=2, alpha=4.0)
    p = method.init(jax.random.key(0, impl="rbg"), comp.params)
    rng = np.random.default_rng(3)
    p = jax.tree_util.tree_map_with_path(  # trained-looking: B away from its zero init
        lambda path, v: jnp.asarray(0.3 * rng.standard_normal(v.shape), v.dtype) if path[-1].key == "lora_b" else v, p)
    adapted = {"/".join(k.key for k in path[:-1]) for path, _ in jax.tree_util.tree_leaves_with_path(p)}
    assert {"vision_model/encoder/layers_0/self_attn/qkv", "qformer/encoder/layer_0/crossattention/attention/query",
            "language_model/model/decoder/layers_1/self_attn/v_proj"} <= adapted
    mask = jnp.asarray(batch["attention_mask"])
    ours = jax.jit(lambda q: pb.apply_with(comp.model.apply, [(method, q)], {"params": comp.params},
                                           attention_mask=mask, **comp.our_inputs(batch)).logits)(p)
    info = peft_io.BaseModelInfo.from_key_maps("blip-2", blip2.blip2_key_maps(config), config=config, task_type=None)
    out_dir = peft_io.export_peft(method, p, info, tmp_path / "lora")
    fresh = transformers.Blip2ForConditionalGeneration.from_pretrained(comp.dir).eval()
    loaded = peft.PeftModel.from_pretrained(fresh, out_dir).eval()
    with torch.no_grad():
        theirs = loaded(**comp.hf_inputs(batch)).logits.numpy()
    real = batch["attention_mask"].astype(bool)
    base = np.asarray(comp.forward(comp.params, comp.our_inputs(batch), mask).logits)
    assert np.abs(np.asarray(ours) - base)[real].max() > 1e-2  # the adapters matter
    diff = record("blip-2+opt LoRA export -> peft logits", np.abs(np.asarray(ours) - theirs)[real].max())
    assert diff <= TOL, diff


def test_missing_qformer_weights_fail_before_tracing(compositions, tmp_path, monkeypatch):
    """A directory without the Q-Former, query tokens and projection: one CheckpointError naming them, raised
    before the model is traced (abstract_params would trace it)."""
    from safetensors.numpy import save_file

    comp = compositions("blip-2", "opt")
    state = io.load_state_dict(comp.dir)
    kept = {k: v for k, v in state.items()
            if not k.startswith(("qformer.", "query_tokens", "language_projection."))}
    save_file(kept, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((comp.dir / "config.json").read_text())

    def traced(*args, **kwargs):
        raise AssertionError("the model was traced before the missing tensors were reported")

    monkeypatch.setattr(blip2, "abstract_params", traced)
    with pytest.raises(CheckpointError) as err:
        blip2.load_blip2(tmp_path)
    message = str(err.value)
    for needle in ("query_tokens", "'qformer'", "language_projection.weight", "qformer.layernorm.weight"):
        assert needle in message, message
    with pytest.raises(CheckpointError, match="load_blip2"):
        blip2.load_instructblip(comp.dir)


def test_compute_dtypes_follow_keep_in_fp32_modules(compositions):
    """bfloat16: BLIP-2's Q-Former stays float32 (transformers' _keep_in_fp32_modules), InstructBLIP's does not."""
    for kind, lm in (("blip-2", "opt"), ("instructblip", "llama")):
        model = blip2.Blip2Config.from_hf(io.load_config(compositions(kind, lm).dir), dtype=jnp.bfloat16).build()
        assert model.vision_model.config.dtype == model.language_model.config.dtype == jnp.bfloat16
        assert model.qformer.config.dtype == (jnp.float32 if kind == "blip-2" else jnp.bfloat16)


def test_config_errors():
    base = {"model_type": "blip-2", "num_query_tokens": 2, "vision_config": VISION, "qformer_config": QFORMER}
    with pytest.raises(ConfigError, match="text_config.model_type 'gpt_neox'"):
        blip2.Blip2Config.from_hf(dict(base, text_config={"model_type": "gpt_neox"}))
    with pytest.raises(ConfigError, match="word_embed_proj_dim=16"):
        blip2.Blip2Config.from_hf(dict(base, text_config=dict(TEXT["opt"], word_embed_proj_dim=16)))
