"""KV-cached decoding against full recomputation, batching, stop tokens, limits."""

from __future__ import annotations

import pytest
import torch

from lmforge.infer import SamplingConfig, generate, generate_tokens
from lmforge.runtime import Runtime

PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7, 6, 5], [3, 3, 3, 3, 3]]
SHAPES = {"MHA": 4, "GQA": 2, "MQA": 1}  # num_kv_heads with num_heads=4


@pytest.mark.parametrize("position", ["rope", "learned", "sinusoidal"])
@pytest.mark.parametrize("attention", list(SHAPES))
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=7),
                                      dict(temperature=0.9, top_k=10, top_p=0.9, repetition_penalty=1.3, seed=3)])
def test_cached_decoding_equals_full_recomputation(make_model, position, attention, sampling):
    model = make_model(position=position, num_kv_heads=SHAPES[attention])
    config = SamplingConfig(max_new_tokens=24, **sampling)
    cached = generate(model, PROMPTS, config)
    full = generate(model, PROMPTS, config, use_cache=False)
    assert cached == full
    assert len({token for row in cached for token in row}) > 10  # real sequences, not one token repeated


def test_eager_and_sdpa_attention_decode_the_same(make_model):
    model = make_model()
    config = SamplingConfig(max_new_tokens=20, temperature=0)
    sdpa = generate(model, PROMPTS, config)
    model.set_attention("eager")
    assert generate(model, PROMPTS, config) == sdpa


def test_a_prompt_pass_puts_only_its_last_position_through_the_output_layer(make_model):
    from lmforge.infer.generate import forward_last
    from lmforge.model import KVCache

    model = make_model()
    prompt = torch.tensor(PROMPTS)  # (3, 5)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    try:
        cache = KVCache.for_model(model, 3, 16)
        last = forward_last(model, prompt, cache, None)
    finally:
        hook.remove()
    assert seen == [(3, model.config.dim)] and cache.length == 5
    with torch.inference_mode():
        torch.testing.assert_close(last, model(prompt)[:, -1], rtol=1e-5, atol=1e-5)


def test_decoding_never_reads_a_cache_position_before_writing_it(make_model):
    """The cache is allocated without zeroing (torch.empty): fill it with NaN and decode; any read of a
    position not yet written would spread NaN into the logits."""
    from lmforge.model import KVCache

    model = make_model(num_kv_heads=2)
    sequence = torch.tensor(PROMPTS)  # (3, 5)
    cache = KVCache.for_model(model, 3, 12)
    for tensor in cache.keys + cache.values:
        tensor.fill_(float("nan"))
    with torch.inference_mode():
        steps = [model(sequence[:, :3], cache)]
        steps += [model(sequence[:, t:t + 1], cache) for t in range(3, 5)]
        cache.crop(4)  # a rejected guess: position 4 is written again before it is read
        steps[-1] = model(sequence[:, 4:5], cache)
        torch.testing.assert_close(torch.cat(steps, dim=1), model(sequence), rtol=1e-5, atol=1e-5)


def test_batch_equals_rows_one_at_a_time(make_model):
    model = make_model()
    config = SamplingConfig(max_new_tokens=16, temperature=0)
    prompts = [*PROMPTS, [4, 5], [60, 61, 62, 63, 1, 2, 3], [7, 7]]  # mixed lengths are grouped
    batch = generate(model, prompts, config)
    assert batch == [generate(model, [prompt], config)[0] for prompt in prompts]


def test_generate_tokens_streams_what_generate_returns(make_model):
    model = make_model()
    config = SamplingConfig(max_new_tokens=16, temperature=0.8, seed=5)
    assert list(generate_tokens(model, PROMPTS[0], config)) == generate(model, PROMPTS[:1], config)[0]


def test_stop_token_ends_each_row_and_is_not_returned(make_model):
    model = make_model()
    free = generate(model, PROMPTS, SamplingConfig(max_new_tokens=16, temperature=0))
    stop = free[0][3]  # the fourth token of row 0
    assert stop not in free[0][:3]
    stopped = generate(model, PROMPTS, SamplingConfig(max_new_tokens=16, temperature=0, stop_token_ids=[stop]))
    for row, out in zip(free, stopped):
        expected = row[:row.index(stop)] if stop in row else row
        assert out == expected
    assert stopped[0] == free[0][:3]
    streamed = list(generate_tokens(model, PROMPTS[0], SamplingConfig(max_new_tokens=16, temperature=0,
                                                                     stop_token_ids=[stop])))
    assert streamed == free[0][:3]


def test_repetition_penalty_breaks_a_repeating_model(make_model):
    model = make_model(tie_embeddings=True, init_std=0.02)  # a tied random model echoes its last token
    prompt = [[10, 11, 12, 13]]
    assert generate(model, prompt, SamplingConfig(max_new_tokens=4, temperature=0)) == [[13] * 4]
    out = generate(model, prompt, SamplingConfig(max_new_tokens=4, temperature=0, repetition_penalty=5.0))[0]
    assert not set(out) & {10, 11, 12, 13}
    assert len(set(out)) == 4


def test_max_new_tokens_is_respected(make_model):
    out = generate(make_model(), PROMPTS, SamplingConfig(max_new_tokens=5, temperature=0))
    assert [len(row) for row in out] == [5, 5, 5]


def test_bad_prompts_raise_value_error(make_model):
    model = make_model()
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[]], SamplingConfig())
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1] * 100], SamplingConfig(max_new_tokens=100))
    with pytest.raises(ValueError, match="beam search"):
        generate_tokens(model, [1], SamplingConfig(num_beams=2, temperature=0))


def test_generation_restores_training_mode(make_model):
    model = make_model(dropout=0.5).train()
    config = SamplingConfig(max_new_tokens=8, temperature=0)
    assert generate(model, PROMPTS, config) == generate(model, PROMPTS, config)  # no dropout while decoding
    assert model.training


def test_bf16_weights_decode_close_to_fp32(make_model):
    model = make_model(init_std=0.05)
    config = SamplingConfig(max_new_tokens=8, temperature=0)
    fp32 = generate(model, PROMPTS, config)
    bf16 = generate(model.to(torch.bfloat16), PROMPTS, config, runtime=Runtime.resolve("cpu", "bf16"))
    agree = sum(a == b for x, y in zip(fp32, bf16) for a, b in zip(x, y))
    assert agree >= 0.75 * 24  # bf16 rounding may flip a near tie, not most tokens


def test_fp32_weights_under_bf16_autocast(make_model):
    model = make_model()
    config = SamplingConfig(max_new_tokens=8, temperature=0)
    out = generate(model, PROMPTS, config, runtime=Runtime.resolve("cpu", "bf16"))
    assert [len(row) for row in out] == [8, 8, 8]
    assert next(model.parameters()).dtype == torch.float32
