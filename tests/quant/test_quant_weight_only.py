"""16-bit weight storage with fp32 arithmetic: same numbers as rounding the weights, half the bytes."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import lmforge.quant.weight_only as weight_only
from lmforge.infer import CompiledDecodeStep, SamplingConfig, generate
from lmforge.model import DecoderLM, KVCache, preset
from lmforge.quant.weight_only import WeightOnlyEmbedding, WeightOnlyLinear, matvec, quantize_weights


def tiny_model(tie: bool = True) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(preset("tiny", vocab_size=96, tie_embeddings=tie, init_std=0.3)).eval()


def rounded(model: DecoderLM, dtype: torch.dtype) -> DecoderLM:
    """A copy whose matrices hold exactly the values a 16-bit store keeps, still in fp32."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.copy_(module.weight.to(dtype).float())
    return model


def test_matvec_is_a_matmul():
    torch.manual_seed(0)
    weight = torch.randn(40, 24)
    for rows in (1, 3):
        x = torch.randn(rows, 24)
        torch.testing.assert_close(matvec(x, weight), x @ weight.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_logits_equal_the_model_with_rounded_weights(dtype):
    model = tiny_model()
    reference = rounded(model, weight_only.WEIGHT_DTYPES[dtype])
    quantized = quantize_weights(copy.deepcopy(model), dtype)
    ids = torch.randint(0, 96, (2, 12))
    with torch.inference_mode():  # (the C++ kernel sums in another order than the fp32 matmul)
        torch.testing.assert_close(quantized(ids), reference(ids), rtol=0, atol=1e-4)
        assert (quantized(ids) - model(ids)).abs().max() > 1e-3  # the rounding is real, not skipped


def test_weights_take_half_the_bytes_and_a_tied_head_stays_tied():
    model = tiny_model(tie=True)
    matrices = sum(m.weight.numel() for m in {id(m.weight): m for m in model.modules()
                                              if isinstance(m, (nn.Linear, nn.Embedding))}.values())
    count = model.num_parameters()
    quantize_weights(model, "fp16")
    assert model.num_parameters() == count  # 16-bit buffers count as the weights they are
    assert not any(isinstance(m, (nn.Linear, nn.Embedding)) for m in model.modules())
    assert isinstance(model.embed, WeightOnlyEmbedding) and isinstance(model.lm_head, WeightOnlyLinear)
    assert model.lm_head.weight is model.embed.weight  # one 16-bit table, as the fp32 model had one
    stored = {id(b): b for b in model.buffers() if b.dtype == torch.float16}.values()
    assert sum(b.numel() * b.element_size() for b in stored) == 2 * matrices  # 2 bytes each, once each
    assert all(not p.requires_grad or p.dim() == 1 for p in model.parameters())  # only norms stay parameters


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="int4"):
        quantize_weights(tiny_model(), "int4")
    with pytest.raises(ValueError, match="fp32"):
        quantize_weights(tiny_model().to(torch.bfloat16), "fp16")


@pytest.mark.slow
def test_compiled_step_takes_the_fused_path_and_decodes_like_eager(monkeypatch):
    calls = []

    def counting_matvec(x, weight):
        calls.append(tuple(weight.shape))
        return matvec(x, weight)

    monkeypatch.setattr(weight_only, "matvec", counting_matvec)
    model = quantize_weights(tiny_model(tie=False), "bf16")
    step = CompiledDecodeStep(model, max_autotune=False)
    step.warm_up(batch_size=1)
    assert (96, model.config.dim) in calls  # the head went through the fused matvec while tracing
    prompt = [[3, 1, 4, 1, 5, 9]]
    config = SamplingConfig(max_new_tokens=10, temperature=0)
    eager = generate(model, prompt, config)
    assert generate(model, prompt, config, decode_step=step) == eager
    with torch.inference_mode():  # one step's logits, compiled against eager
        caches = [KVCache.for_model(model, 1, model.config.max_seq_len) for _ in range(2)]
        for cache in caches:
            model(torch.tensor(prompt), cache)
        token = torch.tensor([[eager[0][0]]])
        torch.testing.assert_close(step(token, caches[0]), model(token, caches[1]), rtol=1e-4, atol=1e-4)
    # Two rows take the widened weights and the ordinary kernels, compiled as well.
    prompts = [[3, 1, 4, 1, 5, 9], [2, 7, 1, 8, 2, 8]]
    assert generate(model, prompts, config, decode_step=step) == generate(model, prompts, config)


def test_load_with_16_bit_weights(tmp_path):
    import lmforge
    from lmforge.checkpoint import save_checkpoint
    from lmforge.errors import InputError
    from lmforge.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["def add(a, b):\n    return a + b\n" * 30], 300)
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=tokenizer.vocab_size, init_std=0.3)).eval()
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    lm = lmforge.load(tmp_path / "ckpt", device="cpu", dtype="fp32", weights="fp16")
    assert isinstance(lm.model.lm_head, WeightOnlyLinear)
    full = lmforge.load(tmp_path / "ckpt", device="cpu", dtype="fp32")
    reference = dataclasses.replace(full, model=rounded(full.model, torch.float16))
    text = lm.generate("def ", max_new_tokens=12, temperature=0)
    assert text and text == reference.generate("def ", max_new_tokens=12, temperature=0)
    with pytest.raises(InputError, match="fp32"):
        lmforge.load(tmp_path / "ckpt", device="cpu", dtype="bf16", weights="fp16")


@pytest.mark.slow
def test_many_compiled_steps_in_one_process_all_stay_compiled(monkeypatch):
    """Dynamo keeps DecoderLM.forward's graphs under one limit (8 by default, one per model
    and batch size): past it a step would silently run eagerly, through the slow path. Here the
    process-wide limit is 1, so that the second batch size's graph already lies past it."""
    calls = []
    monkeypatch.setattr(weight_only, "matvec", lambda x, weight: calls.append(1) or matvec(x, weight))
    monkeypatch.setattr(weight_only, "MATVEC_MAX_ROWS", 8)  # every batch size below takes the matvec path
    torch._dynamo.reset()
    model = quantize_weights(tiny_model(), "fp16")
    step = CompiledDecodeStep(model, max_autotune=False)
    with torch._dynamo.config.patch(recompile_limit=1):
        for batch_size in (1, 2):  # two graphs
            before = len(calls)
            step.warm_up(batch_size)
            assert len(calls) > before, f"batch size {batch_size} was not compiled"
