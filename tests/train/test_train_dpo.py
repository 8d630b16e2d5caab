"""The DPO stage: answer masks, answer log-probabilities, the reference (adapters off or a frozen copy),
the loss variants on the one loop, and the logged figures."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from lmforge.data.preferences import Preference, builtin_preferences, split_preferences
from lmforge.model import DecoderLM, preset
from lmforge.peft.lora import LoraConfig, adapters_disabled, apply_lora, lora_layers
from lmforge.runtime import Runtime
from lmforge.tokenizer import train_tokenizer
from lmforge.train import TrainConfig, fit
from lmforge.train.dpo import DPOStage, PreferenceRows, answer_logps
from lmforge.train.preference import sequence_logps

SEQ = 96
CPU = Runtime.resolve("cpu", "fp32")


@pytest.fixture(scope="module")
def setup():
    pairs = builtin_preferences(400, seed=0)
    tokenizer = train_tokenizer([p.prompt[0]["content"] + " " + p.chosen + " " + p.rejected for p in pairs], 400,
                                progress=False)
    train, val = split_preferences(pairs, 0.2, seed=0)
    return tokenizer, PreferenceRows(tokenizer, train, SEQ), PreferenceRows(tokenizer, val, SEQ)


def tiny(tokenizer, seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=SEQ))


def test_rows_mask_only_the_final_answer(setup):
    tokenizer = setup[0]
    pair = Preference([{"role": "user", "content": "the capital of France?"},
                       {"role": "assistant", "content": "Rome"},  # an earlier answer: context, not a target
                       {"role": "user", "content": "again?"}], "Paris", "Lyon", "test")
    rows = PreferenceRows(tokenizer, [pair], 64)
    for side, text in (("chosen", "Paris"), ("rejected", "Lyon")):
        ids, mask = getattr(rows, side)[0], getattr(rows, side + "_mask")[0]
        answer = tokenizer.decode(ids[mask].tolist())
        assert answer.startswith(text) and "Rome" not in answer
        assert mask.sum() < 6 and mask[:mask.argmax()].sum() == 0 and mask[mask.argmax():][:mask.sum()].all()
    batch = rows.take([0], torch.device("cpu"))
    assert batch["chosen"].shape[1] == int(rows.width[0]) <= 64  # trailing padding cut off


def test_answer_logps_equal_the_full_logits_computation(setup):
    tokenizer, rows, _ = setup
    model = tiny(tokenizer).eval()
    batch = rows.take(list(range(6)), torch.device("cpu"))
    ids, mask = batch["chosen"], batch["chosen_mask"]
    sums, counts = answer_logps(model, ids, mask)
    full, full_counts = sequence_logps(model(ids)[:, :-1], ids[:, 1:], mask[:, 1:])
    torch.testing.assert_close(sums, full, rtol=1e-5, atol=1e-4)
    assert torch.equal(counts, full_counts) and bool((counts > 0).all())


def test_the_reference_is_the_model_with_its_adapters_off(setup):
    tokenizer, rows, _ = setup
    base = tiny(tokenizer).eval()
    policy = apply_lora(copy.deepcopy(base), LoraConfig(rank=4))
    with torch.no_grad():
        for layer in lora_layers(policy).values():
            layer.lora_B.normal_(0, 0.05)  # adapters that change the outputs
    batch = rows.take(list(range(4)), torch.device("cpu"))
    stage = DPOStage(rows, seed=0)
    reference = stage.reference_logps(policy, batch)
    for ours, frozen in zip(reference, DPOStage.logps(base, batch)):
        torch.testing.assert_close(ours, frozen)
    assert not torch.allclose(DPOStage.logps(policy, batch)[0], reference[0])  # switched back on afterwards
    assert all(layer.enabled for layer in lora_layers(policy).values())
    with pytest.raises(ValueError, match="reference"):
        DPOStage(rows, seed=0).reference_logps(base, batch)  # no adapters and no frozen model
    policy.train()
    layer = next(iter(lora_layers(policy).values()))
    layer.merge()
    with pytest.raises(RuntimeError, match="merged"), adapters_disabled(policy):
        pass


def test_rpo_alpha_adds_the_chosen_answers_token_nll(setup):
    tokenizer, rows, _ = setup
    policy = apply_lora(tiny(tokenizer), LoraConfig(rank=4))
    batch = rows.take(list(range(4)), torch.device("cpu"))
    plain, figures = DPOStage(rows, seed=0).losses(policy, batch)
    rpo, rpo_figures = DPOStage(rows, seed=0, rpo_alpha=0.5).losses(policy, batch)
    chosen, _, n_chosen, _ = DPOStage.logps(policy, batch)
    nll = -chosen.sum() / n_chosen.sum()
    torch.testing.assert_close(rpo.mean(), plain.mean() + 0.5 * nll)
    assert "nll_loss" not in figures and rpo_figures["nll_loss"] == pytest.approx(nll.item())
    with pytest.raises(ValueError, match="rpo_alpha"):
        DPOStage(rows, seed=0, rpo_alpha=-1)


def train(stage, model, tmp_path, steps=60, lr=3e-3, **overrides):
    config = TrainConfig(out_dir=str(tmp_path), batch_size=16, seq_len=SEQ, max_steps=steps, lr=lr, warmup_steps=5,
                         eval_every=0, save_every=1000, log_every=10, device="cpu", dtype="fp32", progress=False,
                         **overrides)
    return fit(model, stage, config)


def test_lora_dpo_starts_at_log2_then_prefers_the_chosen_answers(setup, tmp_path):
    tokenizer, rows, val = setup
    model = apply_lora(tiny(tokenizer), LoraConfig(rank=8))
    stage = DPOStage(rows, seed=0, val=val, beta=0.5)
    start = stage.evaluate(model, CPU, 0, 64)
    assert start["val_loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference: every h is 0
    assert start["val_rewards/margins"] == pytest.approx(0, abs=1e-5)
    train(stage, model, tmp_path, steps=60, lr=1e-2)
    after = stage.evaluate(model, CPU, 0, 64)
    assert after["val_loss"] < math.log(2) - 0.1
    assert after["val_rewards/accuracies"] >= 0.7 and after["val_rewards/margins"] > 0
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rows_logged = [r for r in logged if r["kind"] == "train"]
    names = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected"}
    assert len(rows_logged) == 6 and all(names <= set(r) for r in rows_logged)
    assert rows_logged[-1]["rewards/margins"] > rows_logged[0]["rewards/margins"]
    assert stage.pop_metrics() == {}  # the loop took them at each log line


@pytest.mark.parametrize("loss_type,extra", [("ipo", {}), ("sigmoid", {"label_smoothing": 0.1}), ("simpo", {})])
def test_variants_learn_on_the_loop(setup, tmp_path, loss_type, extra):
    tokenizer, rows, val = setup
    model = tiny(tokenizer)
    reference = None if loss_type == "simpo" else tiny(tokenizer)  # full fine-tuning against a frozen copy
    stage = DPOStage(rows, seed=0, val=val, loss_type=loss_type, beta=0.5, reference=reference, **extra)
    frozen = None if reference is None else copy.deepcopy(reference.state_dict())
    before = stage.evaluate(model, CPU, 0, 64)
    train(stage, model, tmp_path, steps=40, lr=3e-3)
    after = stage.evaluate(model, CPU, 0, 64)
    assert after["val_loss"] < before["val_loss"]
    assert after["val_rewards/margins"] > before["val_rewards/margins"]
    if frozen is not None:
        assert all(torch.equal(v, reference.state_dict()[k]) for k, v in frozen.items())
        assert not any(p.requires_grad for p in reference.parameters())


# --- the same tiny model and batch through TRL's DPOTrainer -----------------------------------------------
# Both models go to transformers (lmforge export); TRL patches them with its own fused LM head, computes the
# reference log-probabilities with it, and its ``DPOTrainer._compute_loss`` (called unbound with a stand-in
# ``self``: no accelerator, no dataset) computes the loss and the metrics.


def _to_hf(model: DecoderLM, tokenizer, folder):
    transformers = pytest.importorskip("transformers")
    from lmforge.checkpoint import save_checkpoint
    from lmforge.interop.convert import export_checkpoint

    out = export_checkpoint(save_checkpoint(folder / "ckpt", model, tokenizer), folder / "hf", "hf")
    return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("ipo", 0.5)])
def test_loss_and_metrics_equal_trl_dpo_trainer_on_the_same_model_and_batch(setup, tmp_path, loss_type, beta):
    from collections import defaultdict
    from types import SimpleNamespace

    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    from trl.trainer.utils import add_fused_lm_head

    tokenizer, rows, _ = setup
    reference = tiny(tokenizer, seed=0).eval()
    policy = copy.deepcopy(reference)
    with torch.no_grad():  # a policy that has moved away from its reference
        for param in policy.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    batch = rows.take(list(range(8)), torch.device("cpu"))
    stage = DPOStage(rows, seed=0, loss_type=loss_type, beta=beta, reference=reference)
    with torch.no_grad():
        losses, ours = stage.losses(policy, batch)

    hf_policy, hf_reference = (_to_hf(m, tokenizer, tmp_path / name) for m, name in ((policy, "p"), (reference, "r")))
    for model in (hf_policy, hf_reference):
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    ids = torch.cat([batch["chosen"], batch["rejected"]])
    completion_mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]]).long()
    attention = torch.zeros_like(ids)
    for row, end in enumerate(torch.cat([torch.from_numpy(rows.width[:8])] * 2).tolist()):
        attention[row, :end] = 1  # our rows are right-padded; TRL is told by the attention mask
    labels = ids.masked_fill(completion_mask == 0, -100)
    with torch.no_grad():
        ref = hf_reference(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True).log_probs
    ref_chosen, ref_rejected = ref[:, -(ids.shape[1] - 1):].sum(1).chunk(2)
    identity = lambda x: x  # noqa: E731
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=False), accelerator=SimpleNamespace(device="cpu", gather=identity,
                                                                           gather_for_metrics=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _total_train_tokens=0, _tp_size=1, _metrics={"eval": defaultdict(list)})
    inputs = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion_mask,
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    with torch.no_grad():
        trl_loss = dpo_trainer.DPOTrainer._compute_loss(trainer, hf_policy, inputs, return_outputs=False)
    assert losses.mean().item() == pytest.approx(trl_loss.item(), rel=1e-4, abs=1e-5)
    theirs = {k: v[0] for k, v in trainer._metrics["eval"].items()}
    for name, value in ours.items():
        assert value == pytest.approx(theirs[name], rel=1e-4, abs=1e-4), name
    assert abs(ours["rewards/margins"]) > 1e-3  # the comparison is not between zeros
