"""GGUF in: the packaged SmolLM2-135M-Instruct equals transformers' reading of the same file, and chats.
GGUF out: tensors and tokenizer read back, under pre-tokenizer names llama.cpp knows (checked against a real
llama-server where LMFORGE_LLAMA_SERVER names one)."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from lmforge.api import LanguageModel
from lmforge.checkpoint import load_model, load_tokenizer
from lmforge.errors import InputError
from lmforge.infer import SamplingConfig, generate
from lmforge.interop.gguf import (
    GPT2_SPLIT,
    QWEN2_SPLIT,
    _pre_tokenizer_name,
    load_gguf,
    metadata,
    open_gguf,
    save_gguf,
    tokenizer_from_gguf,
    unpermute_rotary,
)
from lmforge.interop.packaged import packaged_model_path, resolve_model
from lmforge.model import DecoderLM, preset
from lmforge.runtime import Runtime
from lmforge.tokenizer.bytelevel import SPLIT_PATTERN
from lmforge.tokenizer.pretrained import PretrainedTokenizer

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


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return load_tokenizer(smollm2_path())


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


@pytest.mark.parametrize("out_type", ["f32", "f16", "bf16", "q8_0", "q4_0"])
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
            # plus up to 127 steps times the scale's own f16 rounding (2**-11 relative). q4_0: the scale is
            # the block's largest-magnitude weight over -8, so codes run -8..7 on that weight's side and the
            # other side's extreme is clamped at 7: up to a whole step of absmax/8
            levels, rounding = (127, 0.5) if out_type == "q8_0" else (8, 1.0)
            blocks = tensor.reshape(-1, 32)
            step = blocks.abs().amax(-1, keepdim=True) / levels
            assert ((got.reshape(-1, 32) - blocks).abs() <= step * (rounding + levels * 2**-11) + 1e-7).all(), name
    reloaded = load_model(tmp_path / "m.gguf")
    ids = torch.randint(0, small_tokenizer.vocab_size, (1, 24))
    with torch.inference_mode():
        error = (reloaded(ids) - model(ids)).abs().max().item()
    assert error < {"f32": 1e-5, "f16": 1e-2, "bf16": 5e-2, "q8_0": 5e-2, "q4_0": 0.5}[out_type]


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


# ---- tokenizer.ggml.pre: the names llama.cpp knows ----------------------------------------------------------

DIGITS_AND_SPACES = "x  12\n 3 45\t\t6789 a1b22  c 0.5"  # where a split before digits changes the ids


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _sequence(*steps: dict) -> dict:
    return {"type": "Sequence", "pretokenizers": list(steps)}


@pytest.mark.parametrize(("pre_tokenizer", "name"), [
    (_byte_level(True), "gpt-2"),  # GPT-2's tokenizer.json; llama.cpp refuses the "gpt2" lmforge once wrote
    (_sequence(_byte_level(True)), "gpt-2"),
    (_sequence({"type": "Digits", "individual_digits": True}, _byte_level(True)), "smollm"),  # SmolLM2's own
    (_sequence(_split(r"\p{N}"), _split(GPT2_SPLIT), _byte_level(False)), "smollm"),  # as read from a GGUF
    (_sequence(_split(SPLIT_PATTERN), _byte_level(False)), "llama-bpe"),  # lmforge's and Llama 3's
    (_sequence(_split(QWEN2_SPLIT), _byte_level(False)), "qwen2"),
])
def test_pre_tokenizer_names_are_the_ones_llama_cpp_converts_to(pre_tokenizer, name):
    assert _pre_tokenizer_name(pre_tokenizer) == name


@pytest.mark.parametrize("pre_tokenizer", [
    _sequence(_split(r"\s+"), _byte_level(False)),
    _sequence({"type": "Metaspace", "replacement": "▁"}),
    _sequence(_byte_level(False)),
])
def test_pre_tokenizers_llama_cpp_cannot_name_are_refused(pre_tokenizer):
    with pytest.raises(InputError, match="GGUF export"):
        _pre_tokenizer_name(pre_tokenizer)


def _gguf_of(tokenizer, path):
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=tokenizer.vocab_size))
    return save_gguf(path, model.config, dict(model.state_dict()), tokenizer, "f16")


def test_lmforge_tokenizer_is_written_as_llama_bpe_and_reads_back(tmp_path, small_tokenizer):
    meta = metadata(open_gguf(_gguf_of(small_tokenizer, tmp_path / "m.gguf")))
    assert meta["tokenizer.ggml.pre"] == "llama-bpe"
    back = tokenizer_from_gguf(meta, "m.gguf")
    for text in (MIXED, DIGITS_AND_SPACES):
        assert back.encode(text) == small_tokenizer.encode(text)
    assert metadata(open_gguf(_gguf_of(back, tmp_path / "again.gguf")))["tokenizer.ggml.pre"] == "llama-bpe"


@pytest.fixture(scope="module")
def gpt2_style_tokenizer():
    """A byte-level BPE tokenizer laid out as GPT-2's tokenizer.json is (ByteLevel with its own regex)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator([MIXED * 4, DIGITS_AND_SPACES * 4, "The capital of France is Paris. " * 20], trainer)
    return PretrainedTokenizer(hf, {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"})


def test_gpt2_split_is_written_as_gpt_dash_2_and_old_files_are_rewritten(tmp_path, gpt2_style_tokenizer):
    meta = metadata(open_gguf(_gguf_of(gpt2_style_tokenizer, tmp_path / "m.gguf")))
    assert meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.bos_token_id"] == gpt2_style_tokenizer.eos_id  # named, though not added
    assert not meta["tokenizer.ggml.add_bos_token"]
    back = tokenizer_from_gguf(meta, "m.gguf")
    for text in (MIXED, DIGITS_AND_SPACES):
        assert back.encode(text) == gpt2_style_tokenizer.encode(text)
    assert back.bos_id is None and back.bos_token == "<|endoftext|>"
    # a file lmforge wrote before llama.cpp's name was used still reads, and is written back as "gpt-2"
    old = tokenizer_from_gguf({**meta, "tokenizer.ggml.pre": "gpt2"}, "old.gguf")
    assert old.encode(MIXED) == gpt2_style_tokenizer.encode(MIXED)
    assert metadata(open_gguf(_gguf_of(old, tmp_path / "old.gguf")))["tokenizer.ggml.pre"] == "gpt-2"


def test_a_gguf_tokenizer_keeps_its_own_name(tmp_path, gpt2_style_tokenizer):
    meta = metadata(open_gguf(_gguf_of(gpt2_style_tokenizer, tmp_path / "m.gguf")))
    starcoder = tokenizer_from_gguf({**meta, "tokenizer.ggml.pre": "starcoder"}, "starcoder.gguf")
    path = tmp_path / "saved"
    starcoder.save(path)  # an imported checkpoint keeps the name in its tokenizer_config.json
    reloaded = PretrainedTokenizer.from_dir(path)
    assert metadata(open_gguf(_gguf_of(reloaded, tmp_path / "s.gguf")))["tokenizer.ggml.pre"] == "starcoder"


def test_smollm2_keeps_smollm_and_its_digit_split(tmp_path, smollm2_tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = smollm2_tokenizer
    meta = metadata(open_gguf(_gguf_of(tokenizer, tmp_path / "smol.gguf")))
    assert meta["tokenizer.ggml.pre"] == "smollm"
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert not meta["tokenizer.ggml.add_bos_token"]
    back = tokenizer_from_gguf(meta, "smol.gguf")
    assert back.chat_template == tokenizer.chat_template
    assert (back.bos_id, back.eos_id, back.pad_id) == (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    # SmolLM2's tokenizer.json: every digit on its own, then GPT-2's byte-level split
    state = json.loads(tokenizer.hf.to_str())["model"]
    own = Tokenizer(models.BPE(vocab=state["vocab"], merges=[tuple(m) for m in state["merges"]]))
    own.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in ("The capital of France is Paris.", DIGITS_AND_SPACES):
        assert back.encode(text) == tokenizer.encode(text) == own.encode(text).ids


# ---- a real llama-server ----------------------------------------------------------------------------------------

def _llama_server_binary() -> str:
    import os

    binary = os.environ.get("LMFORGE_LLAMA_SERVER")
    if not binary:
        pytest.skip("set LMFORGE_LLAMA_SERVER to a llama.cpp llama-server binary")
    return binary


@contextlib.contextmanager
def _llama_server(binary: str, model_path, context: int = 512):
    """A llama-server on a free loopback port serving ``model_path``; yields post(path, body) -> JSON."""
    import socket
    import subprocess
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = model_path.with_suffix(".log")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    with open(log, "wb") as out:
        server = subprocess.Popen([binary, "-m", str(model_path), "--host", "127.0.0.1", "--port", str(port),
                                   "-t", "1", "-np", "1", "-c", str(context)], stdout=out, stderr=subprocess.STDOUT)

    def post(path: str, body: dict) -> dict:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with opener.open(request, timeout=120) as response:
            return json.loads(response.read())

    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                pytest.fail(f"llama-server exited with {server.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
            try:
                with opener.open(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama-server did not become ready:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        yield post
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_llama_server_tokenizes_and_decodes_an_exported_file_like_lmforge(tmp_path, small_tokenizer):
    """Runs only where LMFORGE_LLAMA_SERVER names a llama-server binary (llama.cpp, built outside lmforge)."""
    binary = _llama_server_binary()
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=small_tokenizer.vocab_size, init_std=0.3, max_seq_len=128)).eval()
    save_gguf(tmp_path / "m.gguf", model.config, dict(model.state_dict()), small_tokenizer, "f32")
    prompt = small_tokenizer.encode("def add(a, b):", add_bos=True)
    ours = generate(model, [prompt], SamplingConfig(max_new_tokens=24, temperature=0))[0]
    with _llama_server(binary, tmp_path / "m.gguf", context=128) as post:
        for text in (MIXED, DIGITS_AND_SPACES):
            got = post("/tokenize", {"content": text, "add_special": False, "parse_special": True})["tokens"]
            assert got == small_tokenizer.encode(text), text
        out = post("/completion", {"prompt": prompt, "n_predict": 24, "temperature": 0, "ignore_eos": True,
                                   "cache_prompt": False, "return_tokens": True})
    assert out["tokens"] == ours


def test_llama_server_tokenizes_like_smollm2(tmp_path, smollm2_tokenizer):
    binary = _llama_server_binary()
    with _llama_server(binary, _gguf_of(smollm2_tokenizer, tmp_path / "smol.gguf")) as post:
        for text in (MIXED, DIGITS_AND_SPACES):
            got = post("/tokenize", {"content": text, "add_special": False, "parse_special": True})["tokens"]
            assert got == smollm2_tokenizer.encode(text), text


@pytest.mark.slow
def test_llama_server_chats_with_exported_smollm2(tmp_path):
    from lmforge.interop.convert import export_checkpoint

    binary = _llama_server_binary()
    path = export_checkpoint(smollm2_path(), tmp_path / "smol-f16.gguf", "gguf", "f16")
    with _llama_server(binary, path) as post:
        out = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "What is the capital of France?"}],
                                            "max_tokens": 16, "temperature": 0})
    assert "Paris" in out["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_the_inspector_sees_it_attend_to_the_animal_in_smollm2(smollm2):
    """docs/INSPECT.md's picture on the real model: in layer 13, head 8, " it" looks at " animal" (not at
    " street"); the logit lens's last row is the model's own next-token guess."""
    from lmforge.inspector import inspect_text

    path, model, tokenizer = smollm2
    seen = inspect_text(LanguageModel(model, tokenizer, Runtime.resolve("cpu", "fp32")),
                        "The animal didn't cross the street because it was too tired.")
    texts = [t.text for t in seen.tokens]
    it, animal, street = texts.index(" it"), texts.index(" animal"), texts.index(" street")
    row = seen.attention[13, 8, it]
    assert row.argmax() == animal and row[animal] > 0.5 > 0.05 > row[street]
    assert seen.lens_top[-1, it, 0] == seen.logits[it].argmax() and texts[it + 1] == " was"
