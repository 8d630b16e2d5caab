"""GPTQ: codes on RTN's grid that keep a layer's output closer on the inputs it sees, and `lmforge quantize
--method gptq` end to end."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.quant.gptq import gptq_quantize, input_hessians
from lmforge.quant.integer import QuantSpec, dequantize, quantize_tensor


def correlated_inputs(n: int, k: int, seed: int) -> torch.Tensor:
    """Inputs whose features move together (as a model's hidden states do): 8 directions, the same for every
    seed, plus noise; ``seed`` draws the samples."""
    directions = torch.randn(8, k, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g) @ directions + 0.3 * torch.randn(n, k, generator=g)


@pytest.mark.parametrize("spec", [QuantSpec(4, "symmetric", "group", 16), QuantSpec(4, "asymmetric", "group", 16),
                                  QuantSpec(4, "symmetric", "channel"), QuantSpec(8, "symmetric", "channel"),
                                  QuantSpec(4, "symmetric", "tensor")])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_keeps_the_layers_output_closer_than_rounding_to_nearest(spec, act_order):
    torch.manual_seed(0)
    weight = torch.randn(24, 64)
    x = correlated_inputs(512, 64, seed=1) * torch.linspace(0.2, 3.0, 64)  # some inputs larger than others
    hessian = x.T @ x / len(x)
    codes, scale, zero = gptq_quantize(weight, hessian, spec, act_order=act_order)
    rtn = quantize_tensor(weight, spec)
    assert codes.shape == rtn[0].shape and scale.shape == rtn[1].shape
    assert (zero is None) == (rtn[2] is None) and (zero is None or zero.shape == rtn[2].shape)
    low, high = (-(2 ** (spec.bits - 1) - 1), 2 ** (spec.bits - 1) - 1) if zero is None else (0, 2 ** spec.bits - 1)
    assert int(codes.min()) >= low and int(codes.max()) <= high  # the same grid: loading and kernels unchanged

    def output_error(codes, scale, zero):
        return float(((x @ weight.T - x @ dequantize(codes, scale, zero).T) ** 2).mean())

    ours, nearest = output_error(codes, scale, zero), output_error(*rtn)
    assert ours < 0.7 * nearest, (ours, nearest)  # the point of it: the output, not each weight
    x_new = correlated_inputs(512, 64, seed=2) * torch.linspace(0.2, 3.0, 64)  # new samples, the same kind
    held_out = float(((x_new @ weight.T - x_new @ dequantize(codes, scale, zero).T) ** 2).mean())
    assert held_out < float(((x_new @ weight.T - x_new @ dequantize(*rtn).T) ** 2).mean())


def test_without_correlations_gptq_rounds_to_nearest_and_a_dead_input_is_zeroed():
    torch.manual_seed(0)
    weight = torch.randn(8, 32)
    for spec in (QuantSpec(8, "symmetric", "channel"), QuantSpec(4, "asymmetric", "group", 8)):
        codes, scale, zero = gptq_quantize(weight, torch.eye(32), spec, damp=0.0)  # nothing to absorb errors into
        rtn = quantize_tensor(weight, spec)
        assert torch.equal(codes, rtn[0]) and torch.allclose(scale, rtn[1])
    x = torch.randn(256, 32)
    x[:, 5] = 0.0  # an input that is always zero: its weights do not matter to the output
    codes, _, _ = gptq_quantize(weight, x.T @ x / len(x), QuantSpec(8, "symmetric", "channel"))
    assert (codes[:, 5] == 0).all()


def test_input_hessians_are_the_mean_outer_product_of_each_layers_inputs():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 6), torch.nn.Linear(6, 4), torch.nn.Linear(4, 3))
    batches = [torch.randint(0, 10, (1, 7)), torch.randint(0, 10, (1, 5))]
    hessians = input_hessians(model, ["1", "2"], batches)
    with torch.no_grad():
        inputs = torch.cat([model[0](b)[0] for b in batches])
        expected = inputs.T @ inputs / 12
    assert torch.allclose(hessians["1"], expected, atol=1e-5)
    assert hessians["2"].shape == (4, 4)
    assert not model[1]._forward_pre_hooks  # the hooks are gone


def test_quantize_with_gptq_writes_a_checkpoint_that_loads(tmp_path, tiny_lm, capsys):
    from lmforge.api import load
    from lmforge.checkpoint import model_state, write_checkpoint
    from lmforge.cli import main

    write_checkpoint(tmp_path / "fp32", tiny_lm.model.config, model_state(tiny_lm.model), tiny_lm.tokenizer)
    (tmp_path / "calib.jsonl").write_text("\n".join(json.dumps({"text": f"The quick brown fox jumps {i} times."})
                                                    for i in range(40)), encoding="utf-8")
    common = ["quantize", str(tmp_path / "fp32"), "--bits", "4", "--granularity", "group", "--group-size", "16",
              "--eval-chars", "1000", "--eval-items", "0"]
    assert main([*common, "--out", str(tmp_path / "gptq"), "--method", "gptq", "--calibrate",
                 str(tmp_path / "calib.jsonl")]) == 0
    assert "rounded by GPTQ (act-order)" in capsys.readouterr().out  # the default order
    report = json.loads((tmp_path / "gptq" / "report.json").read_text())
    assert report["method"] == "gptq" and report["act_order"]
    assert main([*common, "--out", str(tmp_path / "natural"), "--method", "gptq", "--no-act-order", "--calibrate",
                 str(tmp_path / "calib.jsonl")]) == 0
    assert "rounded by GPTQ\n" in capsys.readouterr().out
    assert main([*common, "--out", str(tmp_path / "rtn")]) == 0
    capsys.readouterr()
    gptq, rtn = load(tmp_path / "gptq", device="cpu", dtype="fp32"), load(tmp_path / "rtn", device="cpu", dtype="fp32")
    assert gptq.model.blocks[0].attn.q_proj.spec.activations == "none"  # --calibrate fed GPTQ, not W8A8 scales
    assert not torch.equal(gptq.model.blocks[0].attn.q_proj.qweight, rtn.model.blocks[0].attn.q_proj.qweight)
    assert torch.equal(gptq.model.lm_head.qweight, rtn.model.lm_head.qweight)  # the head is rounded to nearest
    assert isinstance(gptq.generate("The quick", max_new_tokens=5, temperature=0), str)
    assert main([*common, "--out", str(tmp_path / "bad"), "--method", "gptq"]) == 2
    assert "--calibrate" in capsys.readouterr().err
