"""transformers' T5ForConditionalGeneration in and out: the same logits and greedy targets."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.checkpoint import load_model, read_checkpoint
from lmforge.errors import InputError
from lmforge.infer.sampling import SamplingConfig
from lmforge.infer.seq2seq import generate_seq2seq
from lmforge.interop.convert import export_checkpoint, import_model
from lmforge.interop.hf import save_hf
from lmforge.model import EncoderDecoderLM, build_model, preset

transformers = pytest.importorskip("transformers")

VARIANTS = {  # the original T5 (ReLU, tied and scaled output), and v1.1 (GELU-gated, untied), deeper decoder
    "t5-relu-tied": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "t5v1.1-gated-untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_decoder_layers=3),
}


def make_t5(variant: str, tmp_path):
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                                   **VARIANTS[variant])
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():  # T5's initialisation leaves outputs near zero: larger weights tell more apart
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    model.save_pretrained(tmp_path / "hf")
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_t5_reads_with_transformers_logits_and_greedy_targets(variant, tmp_path):
    hf = make_t5(variant, tmp_path)
    ours = load_model(tmp_path / "hf")
    assert isinstance(ours, EncoderDecoderLM)
    source = torch.randint(2, 97, (2, 30))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, 21:] = 0
    target = torch.randint(2, 97, (2, 25))
    with torch.inference_mode():
        expected = hf(input_ids=source, attention_mask=mask, decoder_input_ids=target).logits
        got = ours(source, target, mask)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        theirs = hf.generate(input_ids=source, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             eos_token_id=None, min_new_tokens=12, use_cache=False)[:, 1:]  # (start token first; their cache assumes equal depths)
    sources = [source[0].tolist(), source[1, :21].tolist()]
    assert generate_seq2seq(ours, sources, SamplingConfig(max_new_tokens=12, temperature=0)) == theirs.tolist()


def test_an_lmforge_encoder_decoder_exports_to_transformers_and_imports_back(tmp_path):
    torch.manual_seed(1)
    model = build_model(preset("t5-tiny", vocab_size=90, activation="relu", decoder_layers=3, tie_embeddings=True))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    save_hf(tmp_path / "hf", model.config, state)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["model_type"], config["feed_forward_proj"], config["num_decoder_layers"]) == ("t5", "relu", 3)
    theirs = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    source, target = torch.randint(0, 90, (2, 20)), torch.randint(0, 90, (2, 9))
    with torch.inference_mode():
        expected = model.eval()(source, target)
        torch.testing.assert_close(theirs(input_ids=source, decoder_input_ids=target).logits, expected,
                                   rtol=1e-4, atol=1e-4)
    import_model(tmp_path / "hf", tmp_path / "ckpt")  # and back: lmforge import, lmforge export
    back = load_model(tmp_path / "ckpt")
    with torch.inference_mode():
        torch.testing.assert_close(back(source, target), expected, rtol=1e-5, atol=1e-5)
    export_checkpoint(tmp_path / "ckpt", tmp_path / "again")
    _, again = read_checkpoint(tmp_path / "again")
    for name, tensor in read_checkpoint(tmp_path / "ckpt")[1].items():
        torch.testing.assert_close(again[name], tensor, rtol=1e-6, atol=1e-7)


def test_what_t5_cannot_hold_is_refused(tmp_path):
    model = build_model(preset("t5-tiny", vocab_size=50, position="rope", num_kv_heads=2))
    with pytest.raises(InputError, match="position='rope'.*num_kv_heads=2"):
        save_hf(tmp_path / "out", model.config, model.state_dict())
    from lmforge.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "ckpt", build_model(preset("t5-tiny", vocab_size=50)))
    with pytest.raises(InputError, match="not to GGUF"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "model.gguf", format="gguf")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps(
        {"model_type": "t5", "vocab_size": 10, "d_model": 8, "d_ff": 16, "num_layers": 1, "num_heads": 2,
         "feed_forward_proj": "gated-silu"}))
    with pytest.raises(InputError, match="feed_forward_proj='gated-silu'"):
        load_model(tmp_path / "bad")
