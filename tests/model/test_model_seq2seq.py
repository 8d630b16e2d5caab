"""The encoder-decoder form: caches that equal a recompute, padding that changes nothing real, T5's
relative buckets, and generation (greedy, sampled, beam) through the decoder-only loops."""

from __future__ import annotations

import itertools

import pytest
import torch

from lmforge.infer.sampling import SamplingConfig
from lmforge.infer.seq2seq import beam_search_seq2seq, encode_sources, generate_seq2seq
from lmforge.model import DecoderLM, EncoderDecoderLM, ModelConfig, build_model, preset
from lmforge.model.seq2seq import relative_buckets

POSITIONS = ("relative", "rope", "learned", "sinusoidal")


def make(position: str = "relative", vocab: int = 60, seed: int = 0, **fields) -> EncoderDecoderLM:
    torch.manual_seed(seed)
    model = build_model(preset("t5-tiny", vocab_size=vocab, position=position, **fields)).eval()
    with torch.no_grad():  # larger weights than the initialisation's: outputs that depend on every input
        for param in model.parameters():
            param.mul_(4 if param.dim() > 1 else 1).add_(torch.randn_like(param) * (0.1 if param.dim() == 1 else 0))
    return model


@pytest.mark.parametrize("position", POSITIONS)
def test_cached_decoding_equals_a_full_recompute(position):
    model = make(position, num_kv_heads=2)  # grouped-query attention in both stacks
    source = torch.randint(0, 60, (2, 17))
    target = torch.randint(0, 60, (2, 11))
    with torch.no_grad():
        full = model(source, target)  # (2, 11, V)
        memory = model.encode(source)
        cache = model.new_cache(2, 16)
        steps = [model.decode(target[:, :4], memory, cache=cache)]  # a prefix at once, then one token a pass
        steps += [model.decode(target[:, i:i + 1], None, cache=cache) for i in range(4, 11)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", ["relative", "rope"])
def test_padding_a_source_changes_nothing_real_and_the_backends_agree(position):
    model = make(position)
    short, long = torch.randint(0, 60, (1, 9)), torch.randint(0, 60, (1, 15))
    target = torch.randint(0, 60, (2, 7))
    padded = torch.cat([torch.cat([short, torch.full((1, 6), 5)], dim=1), long])
    mask = torch.ones(2, 15, dtype=torch.long)
    mask[0, 9:] = 0
    with torch.no_grad():
        together = model(padded, target, mask)
        alone = model(short, target[:1])
        model.set_attention("eager")
        eager = model(padded, target, mask)
    torch.testing.assert_close(together[:1], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager, together, rtol=1e-5, atol=1e-5)
    model.set_attention("sdpa")


def test_a_training_pass_and_its_gradients_equal_the_eager_reference():
    """Training on the CPU spells out the biased and the cross attention (compact_attention, not the fused
    kernel): logits and every gradient, relative bias included, equal those of the eager backend."""
    model = make("relative", dropout=0.0).train()
    source, target = torch.randint(0, 60, (2, 13)), torch.randint(0, 60, (2, 7))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, 10:] = 0
    results = []
    for backend in ("sdpa", "eager"):
        model.set_attention(backend)
        model.zero_grad()
        logits = model(source, target, mask)
        logits.square().mean().backward()
        results.append([logits] + [p.grad.clone() for p in model.parameters()])
    model.set_attention("sdpa")
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    assert results[0][-1].abs().sum() > 0 and model.encoder.relative.embed.weight.grad.abs().sum() > 0


def test_the_decoder_attends_to_the_source_and_only_to_earlier_targets():
    model = make()
    source, target = torch.randint(0, 60, (1, 10)), torch.randint(0, 60, (1, 8))
    other_source = source.clone()
    other_source[0, 3] = (other_source[0, 3] + 1) % 60
    later = target.clone()
    later[0, 5] = (later[0, 5] + 1) % 60
    with torch.no_grad():
        base, changed_source, changed_target = model(source, target), model(other_source, target), model(source, later)
    assert not torch.allclose(base, changed_source)  # every target position reads the source
    assert (base[0] - changed_source[0]).abs().amax(-1).min() > 1e-4
    torch.testing.assert_close(changed_target[:, :5], base[:, :5])  # causal: nothing before position 5 moves
    assert not torch.allclose(changed_target[:, 5:], base[:, 5:])


def test_relative_buckets_equal_t5s():
    transformers = pytest.importorskip("transformers")
    bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    relative = torch.arange(-300, 300)[None, :] - torch.arange(0, 40)[:, None]
    for bidirectional, buckets, distance in itertools.product((True, False), (8, 32), (20, 128)):
        expected = bucket(relative, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance)
        assert torch.equal(relative_buckets(relative, bidirectional, buckets, distance), expected)


def test_configs_are_checked_and_build_model_picks_the_form():
    assert isinstance(build_model(preset("tiny")), DecoderLM)
    model = build_model(preset("t5-tiny", vocab_size=100))
    assert isinstance(model, EncoderDecoderLM) and model.config.is_encoder_decoder
    # shared embeddings counted once; the untied output layer once more
    stacks = sum(p.numel() for p in model.encoder.parameters()) + sum(p.numel() for p in model.decoder.parameters())
    assert model.num_parameters() == stacks + 2 * 100 * 64
    assert model.num_parameters(embeddings=False) == stacks + 100 * 64
    with pytest.raises(ValueError, match="encoder-decoder form"):
        ModelConfig(position="relative")
    with pytest.raises(ValueError, match="lm head"):
        ModelConfig(decoder_layers=2, causal=False, head="mlm")
    with pytest.raises(ValueError, match="decoder_layers"):
        ModelConfig(decoder_layers=-1)
    with pytest.raises(ValueError, match="decoder_layers > 0"):
        EncoderDecoderLM(preset("tiny"))


@pytest.mark.parametrize("position", ["relative", "learned"])
def test_greedy_and_sampled_generation_equal_the_uncached_reference_and_each_source_alone(position):
    model = make(position)
    sources = [[3, 4, 5, 6, 7, 8, 9], [10, 11, 12], [5] * 20]
    for config in (SamplingConfig(max_new_tokens=12, temperature=0),
                   SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=20, seed=3),
                   SamplingConfig(max_new_tokens=12, temperature=0, repetition_penalty=1.3)):
        batched = generate_seq2seq(model, sources, config)
        assert batched == generate_seq2seq(model, sources, config, use_cache=False)
        if config.temperature == 0:  # (a sampled batch draws its rows from one generator)
            assert batched == [generate_seq2seq(model, [s], config)[0] for s in sources]
        assert all(len(row) == 12 for row in batched)


def test_a_stop_token_ends_a_row():
    model = make()
    free = generate_seq2seq(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=10, temperature=0))[0]
    stop = free[4]
    stopped = generate_seq2seq(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=10, temperature=0,
                                                                   stop_token_ids=[stop]))[0]
    assert stopped == free[:free.index(stop)]


def test_beam_search_finds_the_likeliest_target():
    """Six tokens, three steps, 36 beams (6^2): beam search cannot miss the best of all 216 targets."""
    model = make(vocab=6)
    source = [1, 2, 3, 4, 5, 1, 2]
    config = SamplingConfig(max_new_tokens=3, temperature=0, num_beams=36, length_penalty=0.0)
    found = beam_search_seq2seq(model, source, config)
    memory, mask = encode_sources(model, [source])
    candidates = torch.tensor(list(itertools.product(range(6), repeat=3)))  # (216, 3)
    inputs = torch.cat([torch.zeros(216, 1, dtype=torch.long), candidates[:, :2]], dim=1)
    with torch.no_grad():
        logp = model.decode(inputs, memory.expand(216, -1, -1), mask.expand(216, -1)).log_softmax(-1)
    scores = logp.gather(2, candidates[:, :, None]).sum((1, 2))
    assert found.tokens == candidates[scores.argmax()].tolist()
    assert found.log_prob == pytest.approx(scores.max().item(), abs=1e-4)
    assert generate_seq2seq(model, [source], config) == [found.tokens]


def test_bad_sources_are_refused():
    model = make()
    with pytest.raises(ValueError, match="empty"):
        generate_seq2seq(model, [[]], SamplingConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="max_seq_len"):
        generate_seq2seq(model, [[1] * 129], SamplingConfig(max_new_tokens=2))
