"""The same code on a GPU: the CPU tests' key claims, checked on CUDA against the CPU or a full recompute.

Skipped where torch sees no CUDA device (CI has none); on a machine with one:
``python -m pytest tests/test_cuda.py``. docs/BENCHMARKS.md records the runs. Before spending GPU
time, ``LMFORGE_CUDA_TESTS=cpu python -m pytest tests/test_cuda.py`` runs the same calls on the CPU
(every "GPU" below is then the CPU): a dry run that catches what changed in the code they call.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lmforge.infer import CompiledDecodeStep, SamplingConfig, generate
from lmforge.infer.engine import Engine
from lmforge.infer.request import Request
from lmforge.model import DecoderLM, ModelConfig, build_model, preset
from lmforge.runtime import Runtime

CUDA = torch.device("cpu" if os.environ.get("LMFORGE_CUDA_TESTS") == "cpu" else "cuda")
GPU = CUDA.type  # for the APIs that take a device name
pytestmark = pytest.mark.skipif(GPU == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [9] * 14 + [1], [3, 3, 8, 2]]


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 products in fp32 (no TF32), so that the GPU's logits can be held to the CPU's."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def tiny(seed: int = 0, device=CUDA, **overrides) -> DecoderLM:
    """As the inference tests' model: untied, a large init so greedy tokens depend on the positions."""
    settings = dict(vocab_size=64, tie_embeddings=False, init_std=0.5)
    torch.manual_seed(seed)
    return DecoderLM(preset("tiny", **{**settings, **overrides})).eval().to(device)


def greedy(n: int = 16, **extra) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=n, temperature=0, **extra)


def test_logits_on_the_gpu_equal_the_cpus():
    model = tiny(device="cpu")
    ids = torch.randint(0, 64, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        on_cpu = model(ids)
        on_gpu = model.to(CUDA)(ids.to(CUDA))
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=2e-4, rtol=2e-4)


def test_the_engine_on_the_gpu_decodes_as_a_full_recompute_and_as_the_cpu():
    model = tiny()
    batch = Engine(model, max_batch_size=4).generate([Request(p, greedy(), logprobs=0) for p in PROMPTS])
    assert {c.finish_reason for c in batch} == {"length"}
    assert [c.token_ids for c in batch] == generate(model, PROMPTS, greedy(), use_cache=False)
    on_cpu = Engine(model.to("cpu"), max_batch_size=4).generate([Request(p, greedy(), logprobs=0) for p in PROMPTS])
    assert [c.token_ids for c in batch] == [c.token_ids for c in on_cpu]
    gpu_logprobs = [e.logprob for c in batch for e in c.logprobs]
    assert gpu_logprobs == pytest.approx([e.logprob for c in on_cpu for e in c.logprobs], abs=1e-3)


def test_seeded_sampling_on_the_gpu_does_not_depend_on_the_batch():
    model = tiny()
    configs = [SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=20, top_p=0.95, seed=s) for s in range(5)]
    alone = [Engine(model, max_batch_size=1).generate([Request(p, c)])[0].token_ids for p, c in zip(PROMPTS, configs)]
    together = Engine(model, max_batch_size=3).generate([Request(p, c) for p, c in zip(PROMPTS, configs)])
    assert [c.token_ids for c in together] == alone


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_continuations_scored_on_the_gpu_equal_one_full_forward(dtype):
    model = tiny()
    runtime = Runtime.resolve(GPU, dtype)
    context, choices = [7, 3, 9, 12, 30], [[10, 11], [12], [13, 14, 15]]
    out = Engine(model, runtime, max_batch_size=2).generate(
        [Request(context, SamplingConfig(max_new_tokens=0), continuations=choices)])[0]
    with torch.no_grad(), runtime.autocast():
        for choice, scored in zip(choices, out.continuation_logprobs):
            ids = torch.tensor([context + choice], device=CUDA)
            logprobs = model(ids).float().log_softmax(-1)[0, len(context) - 1:-1]
            expected = logprobs.gather(-1, ids[0, len(context):, None])[:, 0].tolist()
            assert [e.logprob for e in scored] == pytest.approx(expected, abs=1e-4 if dtype == "fp32" else 0.05)


@pytest.mark.slow
def test_the_compiled_engine_on_the_gpu_decodes_and_scores_as_the_eager_one():
    """Inductor's Triton kernels for the decode step and the packed admission pass: the same tokens and
    log-probs as the eager engine, one graph per decode bucket and one packed graph."""
    from torch._dynamo.utils import counters

    model = tiny()
    eager = Engine(model, max_batch_size=4)
    engine = Engine(model, max_batch_size=4, decode_step=CompiledDecodeStep(model, max_autotune=False, prefill=True))
    engine.warm_up()
    graphs = counters["stats"]["unique_graphs"]
    requests = [Request(p, greedy(12), logprobs=0) for p in PROMPTS]
    scoring = [Request(PROMPTS[4], SamplingConfig(max_new_tokens=0), continuations=[[10, 11], [12], [13, 14, 15]]),
               Request(PROMPTS[1] * 3, greedy(3), prompt_logprobs=0)]
    for got, want in zip(engine.generate(requests) + engine.generate(scoring),
                         eager.generate(requests) + eager.generate(scoring)):
        assert got.token_ids == want.token_ids
        pairs = [(x, y) for p, q in zip(got.continuation_logprobs or [], want.continuation_logprobs or [])
                 for x, y in zip(p, q)] + list(zip(got.prompt_logprobs or [], want.prompt_logprobs or [])) \
            + list(zip(got.logprobs or [], want.logprobs or []))
        assert pairs and all((x is None and y is None) or x.logprob == pytest.approx(y.logprob, abs=1e-4)
                             for x, y in pairs)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled after the warm-up


def test_training_on_the_gpu_resumes_the_same_losses_and_its_checkpoint_loads_on_the_cpu(tmp_path):
    from lmforge.checkpoint import load_model
    from lmforge.train import PretrainStage, TrainConfig, fit
    from lmforge.train.metrics import read_metrics

    tokens = np.tile(np.arange(50), 400).astype(np.uint16)

    def stage() -> PretrainStage:
        return PretrainStage(tokens, 16, 0, val_tokens=tokens[:2000], token_bytes=[1] * 64)

    def config(out) -> TrainConfig:
        return TrainConfig(out_dir=str(out), batch_size=4, seq_len=16, max_steps=12, warmup_steps=2, lr=3e-3,
                           eval_every=6, eval_tokens=256, save_every=6, log_every=1, progress=False,
                           dtype="bf16", device=GPU)

    def model(seed: int = 0) -> DecoderLM:
        torch.manual_seed(seed)
        return DecoderLM(preset("tiny", vocab_size=64, dropout=0.1))  # dropout: the CUDA RNG is resumed too

    def losses(out) -> list[float]:
        return [row["loss"] for row in read_metrics(out / "metrics.jsonl") if row["kind"] == "train"]

    result = fit(model(), stage(), config(tmp_path / "full"))
    cut = stage()
    original = cut.batch

    def batch(step, *args, **kwargs):
        if step == 6:
            raise KeyboardInterrupt  # stopped right after the checkpoint at step 6
        return original(step, *args, **kwargs)

    cut.batch = batch
    with pytest.raises(KeyboardInterrupt):
        fit(model(), cut, config(tmp_path / "cut"))
    torch.manual_seed(12345)
    torch.cuda.manual_seed(12345)  # other RNG states: the resumed run must restore its own
    fit(model(seed=99), stage(), config(tmp_path / "cut"), resume=True)
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert len(full) == len(resumed) == 12 and full[-1] < full[0] - 1.0
    assert full == pytest.approx(resumed, rel=1e-4, abs=1e-4)  # CUDA's atomic-add sums may differ in the last bits
    ids = torch.randint(0, 50, (2, 12))
    trained = load_model(result.checkpoint, device=GPU).eval()
    with torch.no_grad():
        torch.testing.assert_close(load_model(result.checkpoint).eval()(ids), trained(ids.to(CUDA)).cpu(),
                                   atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("spec", [dict(bits=8), dict(bits=4, granularity="group", group_size=32),
                                  dict(bits=8, activations="dynamic"), dict(bits=8, activations="group")],
                         ids=["int8", "int4-g32", "w8a8-row", "w8a8-g32"])
def test_integer_weights_on_the_gpu_equal_the_cpus_kernels(spec):
    """The GPU runs the dequantize-then-multiply reference; the CPU its C++ kernels: the same logits."""
    from lmforge.quant.integer import QuantSpec, quantize_model

    model = tiny(device="cpu", init_std=0.02)
    quantize_model(model, QuantSpec(**spec))
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        on_cpu = model(ids)
        on_gpu = model.to(CUDA)(ids.to(CUDA))
    assert {b.device.type for b in model.buffers()} == {GPU}
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-3, rtol=1e-3)


def test_qlora_on_the_gpu_trains_only_the_adapters():
    from lmforge.peft.lora import LoraConfig, apply_lora
    from lmforge.quant import quantize_model_nf4

    model = tiny(init_std=0.02).train()
    quantize_model_nf4(model)
    apply_lora(model, LoraConfig(rank=4))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.device.type == GPU for p in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.tensor([list(range(32))] * 4, device=CUDA)
    losses = []
    for _ in range(30):
        with torch.autocast(GPU, torch.bfloat16):
            logits = model(ids[:, :-1]).float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("position", ["relative", "rope"])
def test_an_encoder_decoder_decodes_in_the_engine_on_the_gpu_as_alone(position):
    from lmforge.infer.seq2seq import generate_seq2seq

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=300, max_seq_len=64, dim=64, num_layers=2, decoder_layers=2, num_heads=2,
                         num_kv_heads=2, position=position)
    model = build_model(config).eval().to(CUDA)
    sources = [[5, 9, 13], list(range(20, 37)), [7] * 9, [41, 42]]
    reference = generate_seq2seq(model, sources, greedy(10), use_cache=False)
    assert [c.token_ids for c in Engine(model, max_batch_size=2).generate([Request(s, greedy(10)) for s in sources])] \
        == reference


def test_speculative_rows_on_the_gpu_decode_as_plain_rows():
    from lmforge.infer.speculative import DraftModel, PromptLookup

    model = tiny(vocab_size=258)
    plain = Engine(model, max_batch_size=4).generate([Request(p, greedy(24)) for p in PROMPTS[:4]])
    drafters = [PromptLookup(ngram=2), DraftModel.first_layers(model, 1), None, DraftModel(model)]
    speculating = Engine(model, max_batch_size=4).generate(
        [Request(p, greedy(24), drafter=d) for p, d in zip(PROMPTS[:4], drafters)])
    assert [c.token_ids for c in speculating] == [c.token_ids for c in plain]


def test_load_puts_a_saved_checkpoint_on_the_gpu_and_generates_text(tmp_path, tiny_lm):
    from lmforge import load
    from lmforge.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "lm", tiny_lm.model, tiny_lm.tokenizer)
    lm = load(tmp_path / "lm", device=GPU, dtype="bf16")
    assert next(lm.model.parameters()).device.type == GPU
    on_cpu = load(tmp_path / "lm", device="cpu", dtype="fp32")
    text = lm.generate("The quick brown", max_new_tokens=8, temperature=0)
    assert isinstance(text, str) and text == lm.generate("The quick brown", max_new_tokens=8, temperature=0)
    ids = torch.tensor([lm.encode_prompt("Paris is the capital of France.")])
    with torch.no_grad(), lm.runtime.autocast():
        logits = lm.model(ids.to(CUDA)).float().cpu()
    with torch.no_grad():
        torch.testing.assert_close(logits, on_cpu.model(ids), atol=0.05, rtol=0.05)  # bf16 weights there


def test_a_server_on_the_gpu_scores_prompts_as_the_cpu_model(tmp_path, tiny_lm):
    """`lmforge serve` with the model on the GPU: echoed prompt log-probs over HTTP equal the CPU model's,
    and concurrent requests (batched together in the engine) each get their greedy reply."""
    import concurrent.futures

    import httpx

    from lmforge import load
    from lmforge.checkpoint import save_checkpoint
    from lmforge.serve.served_model import ServedModel
    from lmforge.serve.server import background_server

    save_checkpoint(tmp_path / "lm", tiny_lm.model, tiny_lm.tokenizer)
    lm = load(tmp_path / "lm", device=GPU, dtype="fp32")
    prompts = ["The quick brown fox jumps", "Paris is the capital", "[1, 2, 3] true", "null. The lazy dog"]
    with background_server({"tiny": ServedModel("tiny", lm, max_batch_size=4, context=256)}) as url:
        def complete(prompt: str, **params) -> dict:
            body = dict(model="tiny", prompt=prompt, temperature=0, **params)
            return httpx.post(url + "/v1/completions", json=body, timeout=60).raise_for_status().json()

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda p: complete(p, max_tokens=12)["choices"][0]["text"], prompts))
        scored = complete(prompts[0], max_tokens=0, echo=True, logprobs=0)["choices"][0]["logprobs"]
    assert replies == [tiny_lm.generate(p, max_new_tokens=12, temperature=0) for p in prompts]
    ids = tiny_lm.encode_prompt(prompts[0])
    with torch.no_grad():
        reference = torch.log_softmax(tiny_lm.model(torch.tensor([ids]))[0], dim=-1)
    assert scored["token_logprobs"][1:] == pytest.approx([float(reference[i - 1, ids[i]]) for i in range(1, len(ids))],
                                                         abs=1e-4)
