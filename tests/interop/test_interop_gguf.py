"""GGUF in: the packaged SmolLM2-135M-Instruct equals transformers' reading of the same file, and chats."""

from __future__ import annotations

import pytest
import torch

from lmforge.api import LanguageModel
from lmforge.checkpoint import load_model, load_tokenizer
from lmforge.errors import InputError
from lmforge.interop.gguf import unpermute_rotary
from lmforge.interop.packaged import packaged_model_path, resolve_model
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
