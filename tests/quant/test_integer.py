"""Integer weights (lmforge quantize): the formulas, the layer, the checkpoint, the report and the command."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import InputError
from lmforge.quant import kernels
from lmforge.quant.integer import (
    IntLinear,
    QuantSpec,
    dequantize,
    pack_int4,
    quantize_model,
    quantize_tensor,
    unpack_int4,
)


@pytest.mark.parametrize("spec", [QuantSpec(8, "symmetric", "tensor"), QuantSpec(8, "symmetric", "channel"),
                                  QuantSpec(8, "asymmetric", "channel"), QuantSpec(4, "symmetric", "group", 16),
                                  QuantSpec(4, "asymmetric", "group", 16)])
def test_codes_scales_and_the_rounding_bound(spec):
    torch.manual_seed(0)
    weight = torch.randn(24, 64) * torch.linspace(0.1, 3, 24)[:, None] + 0.2  # rows of different ranges, off-centre
    weight[3, 5] = 0.0
    codes, scale, zero = quantize_tensor(weight, spec)
    rows = 1 if spec.granularity == "tensor" else 24
    assert scale.shape == (rows, 64 // spec.group_size if spec.granularity == "group" else 1)
    if spec.scheme == "symmetric":
        qmax = 2 ** (spec.bits - 1) - 1
        assert zero is None and codes.abs().max() <= qmax
        assert int(codes[3, 5]) == 0  # zero stays exactly zero
        # absmax: the largest magnitude of each span lands on +-qmax
        assert codes.abs().reshape(rows, scale.shape[1], -1).amax(-1).eq(qmax).all()
    else:
        assert codes.min() >= 0 and codes.max() <= 2 ** spec.bits - 1 and zero.shape == scale.shape
    back = dequantize(codes, scale, zero)
    spans = scale.repeat_interleave(64 // scale.shape[1], dim=1).expand(24, 64)
    assert ((back - weight).abs() <= spans / 2 + 1e-6).all()  # each weight within half a step
    layer = IntLinear(64, 24, bias=True, spec=spec)
    layer.set_codes(codes, scale, zero)
    assert torch.equal(layer.codes(), codes) and torch.equal(layer.dequantized(), back)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer.reference(x), F.linear(x, back, layer.bias), rtol=0, atol=0)
    torch.testing.assert_close(layer(x), F.linear(x, back, layer.bias))  # the kernels, where built


def test_int4_packs_two_codes_a_byte():
    codes = torch.arange(-8, 8).repeat(4, 2)  # (4, 32): every code
    packed = pack_int4(codes, 8)
    assert packed.dtype == torch.uint8 and packed.shape == (4, 16)
    assert torch.equal(unpack_int4(packed, 8), codes)
    assert int(packed[0, 0]) == (0 | (1 << 4))  # -8 and -7, shifted to 0 and 1: the even column in the low bits


def test_bad_specs_are_named():
    with pytest.raises(InputError, match="bits must be 8 or 4"):
        QuantSpec(bits=3)
    with pytest.raises(InputError, match="scheme"):
        QuantSpec(scheme="nf4")
    with pytest.raises(InputError, match="does not divide"):
        QuantSpec(4, granularity="group", group_size=48).groups(64)
    with pytest.raises(InputError, match="multiple of 32.*int8-row"):  # activation groups of 32 inputs
        QuantSpec(8, activations="group").groups(80)
    assert QuantSpec(8, activations="dynamic").groups(80) == 1  # one activation scale a row fits any width


def test_a_quantized_model_saves_loads_and_generates(tmp_path, tiny_lm, capsys):
    from lmforge.api import load
    from lmforge.checkpoint import model_state, write_checkpoint
    from lmforge.cli import main
    from lmforge.quant.ptq import quantize_checkpoint

    write_checkpoint(tmp_path / "fp32", tiny_lm.model.config, model_state(tiny_lm.model), tiny_lm.tokenizer)
    ids = torch.tensor([tiny_lm.encode_prompt("The quick brown fox jumps over the lazy dog.")])
    with torch.no_grad():
        reference = tiny_lm.model(ids)
    report = quantize_checkpoint(tmp_path / "fp32", tmp_path / "int8", QuantSpec(8), eval_chars=2000, eval_items=12)
    assert report.task == "pyref_mc" and report.task_items == 12  # held-out accuracy before and after
    assert 0 <= report.accuracy_before <= 1 and 0 <= report.accuracy_after <= 1
    assert "pyref_mc accuracy (12 held-out items" in report.table()
    assert len(report.layers) == 7 * tiny_lm.model.config.num_layers + 1  # q k v o gate up down, and the output layer
    assert report.memory_after < report.memory_before / 2 and abs(report.bpb_change) < 0.01
    int8 = load(tmp_path / "int8", device="cpu", dtype="fp32")
    layer = int8.model.blocks[0].attn.q_proj
    assert isinstance(layer, IntLinear) and layer.qweight.dtype == torch.int8
    with torch.no_grad():
        logits = int8.model(ids)
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()  # int8: close to fp32
    assert int8.generate("The quick", max_new_tokens=8, temperature=0) == \
           int8.generate("The quick", max_new_tokens=8, temperature=0)
    # the same model quantized in memory gives the same logits as the one loaded from disk
    twin = load(tmp_path / "fp32", device="cpu", dtype="fp32")
    quantize_model(twin.model, QuantSpec(8))
    with torch.no_grad():
        torch.testing.assert_close(twin.model(ids), logits, rtol=0, atol=0)
    bf16 = load(tmp_path / "int8", device="cpu", dtype="bf16")  # activations in bf16, scales kept in fp32
    assert bf16.model.blocks[0].attn.q_proj.scale.dtype == torch.float32
    assert bf16.model.blocks[0].attn.q_proj.qweight.dtype == torch.int8
    assert isinstance(bf16.generate("The quick", max_new_tokens=4, temperature=0), str)
    for name in ("report.md", "weight_error.png", "quantization.json", "report.json"):
        assert (tmp_path / "int8" / name).is_file()
    assert json.loads((tmp_path / "int8" / "quantization.json").read_text())["bits"] == 8

    # exported (GGUF, transformers) from its dequantized weights: the same logits
    from lmforge.checkpoint import load_model
    from lmforge.interop.convert import export_checkpoint

    export_checkpoint(tmp_path / "int8", tmp_path / "int8.gguf", format="gguf", gguf_type="f32")
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "int8.gguf")(ids), logits, rtol=0, atol=1e-4)
    assert main(["quantize", str(tmp_path / "fp32"), "--out", str(tmp_path / "int4"), "--bits", "4",
                 "--scheme", "asymmetric", "--granularity", "group", "--group-size", "32", "--eval-chars", "1000",
                 "--eval-items", "0"]) == 0
    out = capsys.readouterr().out
    assert "int4 asymmetric, per group 32" in out and "bits per byte" in out
    int4 = load(tmp_path / "int4", device="cpu", dtype="fp32")
    assert int4.model.blocks[0].ffn.up_proj.qweight.dtype == torch.uint8
    assert (tmp_path / "int4" / "model.safetensors").stat().st_size < (tmp_path / "int8" / "model.safetensors").stat().st_size
    assert main(["quantize", str(tmp_path / "fp32"), "--out", str(tmp_path / "bad"), "--bits", "4",
                 "--granularity", "group", "--group-size", "48"]) == 2
    assert "does not divide" in capsys.readouterr().err


@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(4, "symmetric", "group", 16)], ids=["int8", "int4"])
def test_a_tied_embedding_is_quantized_once_and_serves_the_head(tmp_path, spec):
    from lmforge.checkpoint import load_model, save_checkpoint
    from lmforge.model import DecoderLM, preset
    from lmforge.quant.integer import IntEmbedding, dequantized_state, read_spec, spec_json

    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=96, tie_embeddings=True, init_std=0.3)).eval()
    table = model.embed.weight.detach().clone()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    count = model.num_parameters()
    errors = quantize_model(model, spec)
    assert model.num_parameters() == count  # integer codes count as the weights they stand for, the table once
    assert "embed" in errors and "lm_head" not in errors
    embed, head = model.embed, model.lm_head
    assert isinstance(embed, IntEmbedding) and isinstance(head, IntLinear)
    assert head.qweight is embed.qweight and head.scale is embed.scale  # one table, two uses
    back = embed.dequantized()
    torch.testing.assert_close(embed(ids), back[ids], rtol=0, atol=0)  # a lookup dequantizes its rows
    assert (back - table).abs().max() <= embed.scale.max() / 2 + 1e-6
    with torch.no_grad():
        logits = model(ids)
    save_checkpoint(tmp_path / "q", model)
    (tmp_path / "q" / "quantization.json").write_text(spec_json(spec, list(errors)))
    from safetensors.torch import load_file
    stored = load_file(tmp_path / "q" / "model.safetensors")
    assert "embed.qweight" in stored and not any(name.startswith("lm_head") for name in stored)
    loaded = load_model(tmp_path / "q")
    assert loaded.lm_head.qweight is loaded.embed.qweight
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), logits, rtol=0, atol=0)
    weights = dequantized_state(stored, *read_spec(tmp_path / "q"))
    torch.testing.assert_close(weights["embed.weight"], back)
    assert loaded.to(torch.bfloat16).embed(ids).dtype == torch.bfloat16  # lookups follow the model's dtype


def test_w8a8_checkpoints_per_group_row_and_calibrated(tmp_path, tiny_lm, capsys):
    from lmforge.api import load
    from lmforge.checkpoint import model_state, write_checkpoint
    from lmforge.cli import main

    write_checkpoint(tmp_path / "fp32", tiny_lm.model.config, model_state(tiny_lm.model), tiny_lm.tokenizer)
    (tmp_path / "calib.jsonl").write_text("\n".join(json.dumps({"text": f"The quick brown fox jumps over the lazy dog {i}."})
                                                    for i in range(40)), encoding="utf-8")
    ids = torch.tensor([tiny_lm.encode_prompt("The quick brown fox jumps over the lazy dog.")])
    with torch.no_grad():
        reference = tiny_lm.model(ids)
    for name, flags in (("group", ["--activations", "int8"]), ("dynamic", ["--activations", "int8-row"]),
                        ("static", ["--calibrate", str(tmp_path / "calib.jsonl")])):
        assert main(["quantize", str(tmp_path / "fp32"), "--out", str(tmp_path / name), "--eval-chars", "1000",
                     "--eval-items", "0", *flags]) == 0
        assert "int8 activations" in capsys.readouterr().out
        lm = load(tmp_path / name, device="cpu", dtype="fp32")
        layer = lm.model.blocks[0].attn.q_proj
        assert layer.spec.activations == name
        # lmforge.load lays the codes out for the VNNI kernel where the CPU has one (the fused q/k/v layer runs)
        assert (lm.model.blocks[0].attn.qkv.layer.il_codes is not None) == kernels.interleaves()
        if name == "static":  # a calibrated scale per layer, saved and loaded
            assert layer.act_scale is not None and 0 < float(layer.act_scale) < 1
        else:
            assert layer.act_scale is None
        with torch.no_grad():
            logits = lm.model(ids)
        assert (logits - reference).abs().max() < 0.1 * reference.abs().max()
    assert main(["quantize", str(tmp_path / "fp32"), "--out", str(tmp_path / "bad"), "--calibrate",
                 str(tmp_path / "missing.txt")]) == 2
    assert "no such calibration file" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "fp32"), "--out", str(tmp_path / "bad"), "--scheme", "asymmetric",
                 "--activations", "int8"]) == 2
    assert "symmetric int8 weights" in capsys.readouterr().err
