import pytest
import torch

from lmforge.errors import InputError
from lmforge.model import DecoderLM, KVCache, ModelConfig, forward_flops_per_token, matmul_parameters, preset
from lmforge.model.attention import causal_mask, eager_attention, sdpa_attention

VARIANTS = [
    dict(),  # RoPE, RMSNorm, SwiGLU, GQA (the defaults)
    dict(num_kv_heads=4),  # MHA
    dict(num_kv_heads=1),  # MQA
    dict(position="learned", norm="layernorm", activation="gelu", tie_embeddings=False, bias=True),
    dict(position="sinusoidal", activation="relu"),
]


def tiny(**overrides) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(preset("tiny", vocab_size=97, **overrides)).eval()


@pytest.mark.parametrize("overrides", VARIANTS)
def test_sdpa_matches_explicit_softmax(overrides):
    model = tiny(**overrides)
    ids = torch.randint(0, 97, (2, 33))
    fast = model(ids)
    model.set_attention("eager")
    reference = model(ids)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", VARIANTS)
def test_cached_forward_equals_full_forward(overrides):
    model = tiny(**overrides)
    ids = torch.randint(0, 97, (2, 24))
    full = model(ids)
    cache = KVCache.for_model(model, batch_size=2, max_len=32)
    # a prefill of 10, then a chunk of 5 (mask with an offset), then single tokens
    pieces = [model(ids[:, :10], cache), model(ids[:, 10:15], cache)]
    pieces += [model(ids[:, t:t + 1], cache) for t in range(15, 24)]
    assert cache.length == 24
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_causality_future_tokens_do_not_change_the_past():
    model = tiny()
    ids = torch.randint(0, 97, (1, 20))
    changed = ids.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 97
    torch.testing.assert_close(model(ids)[:, :12], model(changed)[:, :12])
    assert not torch.allclose(model(ids)[:, 12:], model(changed)[:, 12:])


def test_causal_mask_with_offset():
    mask = causal_mask(2, 4, torch.device("cpu"))
    assert mask.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_gqa_equals_mha_with_repeated_heads():
    torch.manual_seed(0)
    q = torch.randn(1, 4, 6, 8)
    k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    grouped = sdpa_attention(q, k, v)
    repeated = eager_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    torch.testing.assert_close(grouped, repeated, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_share_storage_and_count_once():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert tied.lm_head.weight.data_ptr() == tied.embed.weight.data_ptr()
    assert untied.num_parameters() - tied.num_parameters() == 97 * 64


def test_kv_heads_shrink_the_projections():
    assert tiny(num_kv_heads=1).blocks[0].attn.k_proj.weight.shape == (16, 64)  # 1 head of 16
    assert tiny(num_kv_heads=4).blocks[0].attn.k_proj.weight.shape == (64, 64)


def test_config_validation_is_clear():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="position"):
        ModelConfig(position="alibi")
    with pytest.raises(InputError, match="unknown model preset"):
        preset("huge")
    with pytest.raises(InputError, match="unknown model config fields"):
        ModelConfig.from_dict({"width": 3})


def test_too_long_sequence_is_refused():
    model = tiny()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_swiglu_width_and_flops():
    config = ModelConfig(dim=256, vocab_size=1000)
    assert config.ffn_dim == 704  # 8/3 * 256 = 682.7, rounded up to a multiple of 64
    per_layer = 256 * 256 * 2 + 256 * 128 * 2 + 3 * 256 * 704
    assert matmul_parameters(config) == 6 * per_layer + 256 * 1000
    assert forward_flops_per_token(config, seq_len=0) == 2 * matmul_parameters(config)
    model = DecoderLM(config)
    # every matmul weight is a parameter; the rest are norms
    norms = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 1)
    assert model.num_parameters() - norms == matmul_parameters(config)


def test_initial_loss_is_near_uniform():
    model = tiny()
    ids = torch.randint(0, 97, (4, 64))
    logits = model(ids)
    targets = torch.randint(0, 97, (4, 64))
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.1


@pytest.mark.parametrize("overrides", VARIANTS)
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_packed_rows_equal_each_example_alone(overrides, backend):
    from lmforge.model.transformer import positions_in_segments

    model = tiny(**overrides)
    model.set_attention(backend)
    lengths = [7, 12, 5]
    examples = [torch.randint(0, 97, (1, n)) for n in lengths]
    packed = torch.cat(examples, dim=1)  # (1, 24): three examples back to back
    segments = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    assert positions_in_segments(segments)[0, 5:9].tolist() == [5, 6, 0, 1]
    logits = model(packed, segments=segments)
    torch.testing.assert_close(logits, torch.cat([model(e) for e in examples], dim=1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not for a KV-cached decode"):
        model(packed, KVCache.for_model(model, 1, 32), segments=segments)


def test_grouped_query_attention_equals_the_reference_with_ragged_rows():
    from lmforge.model.attention import eager_attention, grouped_query_attention, sdpa_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 6, 1, 8), torch.randn(3, 2, 10, 8), torch.randn(3, 2, 10, 8)  # GQA: 3 heads per kv head
    mask = (torch.arange(10)[None, :] <= torch.tensor([[2], [9], [5]]))[:, None, None, :]  # rows of 3, 10, 6 keys
    reference = eager_attention(q, k, v, mask=mask)
    torch.testing.assert_close(grouped_query_attention(q, k, v, mask), reference)
    low = sdpa_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask=mask)  # takes the grouped path in bf16
    torch.testing.assert_close(low.float(), reference, atol=3e-2, rtol=3e-2)
    # several new tokens a row (a speculative step): causal among themselves, ragged across rows
    q4 = torch.randn(3, 6, 4, 8)
    last = torch.tensor([[3], [9], [5]])  # each row's first new token sees keys 0..last - 3
    mask4 = (torch.arange(10)[None, None, :] <= (last - 3 + torch.arange(4))[:, :, None])[:, None]
    torch.testing.assert_close(grouped_query_attention(q4, k, v, mask4), eager_attention(q4, k, v, mask=mask4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_of_grouped_attention_does_not_depend_on_the_rows_beside_it(dtype):
    """What keeps a speculative step's greedy output that of plain decoding: the pending token's
    row of a (B, 1 + k) step equals, to the bit, the same token's one-token step."""
    from lmforge.model.attention import grouped_query_attention

    torch.manual_seed(0)
    k, v = torch.randn(2, 3, 70, 64, dtype=dtype), torch.randn(2, 3, 70, 64, dtype=dtype)
    q = torch.randn(2, 9, 5, 64, dtype=dtype)
    seen = torch.tensor([[40], [65]])
    mask = (torch.arange(70)[None, None, :] <= (seen + torch.arange(5))[:, :, None])[:, None]
    whole = grouped_query_attention(q, k, v, mask)
    for t in range(5):
        alone = grouped_query_attention(q[:, :, t:t + 1], k, v, mask[:, :, t:t + 1])
        assert torch.equal(alone, whole[:, :, t:t + 1]), t


MASKS = ["bias", "padding", "causal", "none"]


def attention_case(mask_kind: str, dtype: torch.dtype, kv_heads: int = 2):
    """q (2, 4, 6, 8), k and v over 9 keys (kv_heads of them), leaves needing gradients, and a mask of the kind."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 6, 8, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, 9, 8, dtype=dtype, requires_grad=True) for _ in range(2))
    mask = None
    if mask_kind == "bias":  # a learned bias (T5's relative positions), -inf where a key is hidden
        mask = torch.randn(1, 4, 6, 9, requires_grad=True)
        mask.data[..., 0, 7:] = float("-inf")
    elif mask_kind == "padding":
        mask = (torch.arange(9) < torch.tensor([[9], [5]]))[:, None, None, :]
    causal = mask_kind == "causal"
    return q, k, v, mask, causal


@pytest.mark.parametrize("mask_kind", MASKS)
def test_compact_attention_and_its_gradients_equal_the_reference(mask_kind):
    from lmforge.model.attention import compact_attention

    outputs = {}
    for fn in (compact_attention, eager_attention):
        q, k, v, mask, causal = attention_case(mask_kind, torch.float32)
        out = fn(q, k, v, mask=mask, causal=causal)
        out.square().sum().backward()
        leaves = [q, k, v] + ([mask] if mask_kind == "bias" else [])
        outputs[fn] = [out] + [leaf.grad for leaf in leaves]
    for ours, reference in zip(outputs[compact_attention], outputs[eager_attention]):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    # in bf16 every step is rounded to bf16, within bf16's error of the fp32 reference
    q, k, v, mask, causal = attention_case(mask_kind, torch.bfloat16)
    low = compact_attention(q, k, v, mask=mask, causal=causal)
    torch.testing.assert_close(low.float(), outputs[eager_attention][0], rtol=3e-2, atol=3e-2)


def test_training_on_the_cpu_spells_out_biased_and_bf16_bidirectional_attention(monkeypatch):
    from lmforge.model import attention

    calls = []
    monkeypatch.setattr(attention, "compact_attention", lambda *a, **k: calls.append(1) or eager_attention(*a[:3]))
    expected = {("bias", torch.float32): True, ("bias", torch.bfloat16): True,
                ("padding", torch.bfloat16): True, ("none", torch.bfloat16): True,
                ("padding", torch.float32): False, ("none", torch.float32): False,
                ("causal", torch.bfloat16): False, ("causal", torch.float32): False}
    for (mask_kind, dtype), spelled in expected.items():
        q, k, v, mask, causal = attention_case(mask_kind, dtype, kv_heads=4)
        for training in (False, True):
            calls.clear()
            sdpa_attention(q, k, v, training=training, mask=mask, causal=causal)
            assert bool(calls) == (spelled and training), (mask_kind, dtype, training)
