"""GGUF in: the packaged SmolLM2-135M-Instruct equals transformers' reading of the same file, and chats."""

from __future__ import annotations

import pytest
import torch

from lmforge.api import LanguageModel
from lmforge.checkpoint import load_model, load_tokenizer
from lmforge.errors import InputError
from lmforge.infer import SamplingConfig, generate
from lmforge.interop.gguf import load_gguf, save_gguf, unpermute_rotary
from lmforge.interop.packaged import packaged_model_path, resolve_model
from lmforge.model import DecoderLM, preset
from lmforge.runtime import Runtime

MIXED = "def f(x):\n    return x  # 注释 🙂\n\nThe  café, naïve — 日本語 <|im_end|> and tabs\t\tend. 12345"


def smollm2_path():
    try:
        return packaged_model_path("smollm2-135m-instruct")
    except InputError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    return path, load_model(path), load_tokenizer(path)


@pytest.mark.slow
def test_logits_and_ids_equal_transformers_reading_the_same_file(smollm2):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    path, model, tokenizer = smollm2
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = tokenizer.encode(MIXED)
    assert ids == hf_tokenizer.encode(MIXED, add_special_tokens=False)
    assert tokenizer.decode(ids) == MIXED
    batch = torch.tensor([ids[:40]])
    with torch.inference_mode():
        ours, theirs = model(batch), hf(batch).logits
    # 30 fp32 layers summed in another order: within 1e-4 of the logits' scale, same argmax everywhere
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.slow
def test_greedy_chat_knows_the_capital_of_france(smollm2):
    path, model, tokenizer = smollm2
    lm = LanguageModel(model, tokenizer, Runtime.resolve("cpu", "fp32"))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert prompt.endswith("<|im_start|>assistant\n")
    answer = lm.generate(prompt, max_new_tokens=16, temperature=0)
    assert "Paris" in answer
    assert "<|im_end|>" not in answer  # the end-of-turn token stops generation and is not shown


def test_unpermute_rotary_restores_rotate_half_order():
    heads, head_dim = 2, 6
    hf_rows = torch.arange(heads * head_dim).float()[:, None]  # (12, 1): row ids in HF order
    # llama.cpp's order: within each head, interleave the first and second halves.
    gguf_rows = hf_rows.reshape(heads, 2, head_dim // 2, 1).transpose(1, 2).reshape(-1, 1)
    assert gguf_rows[:6, 0].tolist() == [0, 3, 1, 4, 2, 5]
    torch.testing.assert_close(unpermute_rotary(gguf_rows, heads), hf_rows)


def test_short_names_and_missing_files(tmp_path):
    assert resolve_model(tmp_path) == tmp_path
    with pytest.raises(InputError, match="GGUF file not found"):
        load_model(tmp_path / "missing.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(InputError, match="not a readable GGUF file"):
        load_model(tmp_path / "bad.gguf")


@pytest.fixture(scope="module")
def small_tokenizer():
    from lmforge.tokenizer import train_tokenizer

    texts = [MIXED * 4, "def add(a, b):\n    return a + b\n" * 20, "The capital of France is Paris. " * 20]
    return train_tokenizer(texts, 300)


@pytest.mark.parametrize("out_type", ["f32", "f16", "bf16", "q8_0"])
def test_gguf_export_reads_back_the_same_tensors(out_type, tmp_path, small_tokenizer):
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=small_tokenizer.vocab_size, tie_embeddings=False)).eval()
    state = {k: v for k, v in model.state_dict().items()}
    save_gguf(tmp_path / "m.gguf", model.config, state, small_tokenizer, out_type)
    config, back, meta = load_gguf(tmp_path / "m.gguf")
    assert config == model.config
    for name, tensor in state.items():
        got = back[name].float()
        if tensor.dim() == 1 or out_type == "f32":
            assert torch.equal(got, tensor), name  # norms always stay f32
        elif out_type in ("f16", "bf16"):
            assert torch.equal(got, tensor.to(getattr(torch, {"f16": "float16", "bf16": "bfloat16"}[out_type])).float())
        else:  # q8_0: blocks of 32 share a scale absmax/127 stored in f16: half a step of rounding,
            # plus up to 127 steps times the scale's own f16 rounding (2**-11 relative)
            blocks = tensor.reshape(-1, 32)
            step = blocks.abs().amax(-1, keepdim=True) / 127
            assert ((got.reshape(-1, 32) - blocks).abs() <= step * (0.5 + 127 * 2**-11)).all(), name
    reloaded = load_model(tmp_path / "m.gguf")
    ids = torch.randint(0, small_tokenizer.vocab_size, (1, 24))
    with torch.inference_mode():
        error = (reloaded(ids) - model(ids)).abs().max().item()
    assert error < {"f32": 1e-5, "f16": 1e-2, "bf16": 5e-2, "q8_0": 5e-2}[out_type]


def test_gguf_keeps_the_tokenizer(tmp_path, small_tokenizer):
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=small_tokenizer.vocab_size))
    save_gguf(tmp_path / "m.gguf", model.config, dict(model.state_dict()), small_tokenizer, "f16")
    back = load_tokenizer(tmp_path / "m.gguf")
    assert back.encode(MIXED) == small_tokenizer.encode(MIXED)
    assert (back.bos_id, back.eos_id) == (small_tokenizer.bos_id, small_tokenizer.eos_id)
    assert back.encode("hi", add_bos=True)[0] == small_tokenizer.bos_id  # lmforge models expect the BOS


def test_gguf_export_refuses_what_it_cannot_write(tmp_path):
    model = DecoderLM(preset("tiny", vocab_size=50, position="learned", norm="layernorm"))
    with pytest.raises(InputError, match="does not fit the Llama layout"):
        save_gguf(tmp_path / "m.gguf", model.config, dict(model.state_dict()))
    model = DecoderLM(preset("tiny", vocab_size=50))
    with pytest.raises(InputError, match="choose one of"):
        save_gguf(tmp_path / "m.gguf", model.config, dict(model.state_dict()), out_type="q4_k")


LLAMA_CPP_GREEDY = r"""
import json, sys
from llama_cpp import Llama
path, prompt, count = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=128, n_threads=1, verbose=False)
out = []
for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
    out.append(token)
    if len(out) == count:
        break
print(json.dumps(out))
"""


def test_llama_cpp_decodes_an_exported_file_like_lmforge(tmp_path, small_tokenizer):
    """Runs only where LMFORGE_LLAMA_CPP_PYTHON names a Python with llama-cpp-python (kept out of
    lmforge's environment: it compiles llama.cpp for minutes and must not touch torch)."""
    import json
    import os
    import subprocess

    python = os.environ.get("LMFORGE_LLAMA_CPP_PYTHON")
    if not python:
        pytest.skip("set LMFORGE_LLAMA_CPP_PYTHON to a Python that has llama-cpp-python")
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=small_tokenizer.vocab_size, init_std=0.3, max_seq_len=128)).eval()
    save_gguf(tmp_path / "m.gguf", model.config, dict(model.state_dict()), small_tokenizer, "f32")
    prompt = small_tokenizer.encode("def add(a, b):", add_bos=True)
    ours = generate(model, [prompt], SamplingConfig(max_new_tokens=24, temperature=0))[0]
    out = subprocess.run([python, "-c", LLAMA_CPP_GREEDY, str(tmp_path / "m.gguf"), json.dumps(prompt), "24"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == ours
