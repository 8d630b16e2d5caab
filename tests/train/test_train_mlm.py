"""Masked-language-model pretraining: BERT's corruption, pairs for next-sentence prediction, an
encoder that learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.model import DecoderLM, preset
from lmforge.runtime import Runtime
from lmforge.tokenizer.special import NUM_SPECIAL
from lmforge.train.mlm import CLS, IGNORE, MASK_ID, SEP, MaskedLMStage, mask_tokens


def test_masking_follows_bert_proportions_and_never_touches_special_tokens():
    rng = np.random.default_rng(0)
    ids = rng.integers(NUM_SPECIAL, 500, size=(400, 500))
    ids[:, 0], ids[:, -1], ids[:, 250] = CLS, SEP, 2  # specials: never chosen
    inputs, targets = mask_tokens(ids, np.random.default_rng(1), vocab_size=500)
    chosen = targets != IGNORE
    assert not chosen[:, [0, 250, -1]].any()
    assert (targets[chosen] == ids[chosen]).all() and (inputs[~chosen] == ids[~chosen]).all()
    assert chosen.mean() == pytest.approx(0.15 * 497 / 500, abs=0.005)
    masked, kept = (inputs[chosen] == MASK_ID).mean(), (inputs[chosen] == ids[chosen]).mean()
    randomized = 1 - masked - kept
    assert masked == pytest.approx(0.8, abs=0.01) and kept == pytest.approx(0.1, abs=0.01)
    assert randomized == pytest.approx(0.1 - 0.1 / 490, abs=0.01)  # a random token may equal the original
    assert inputs[chosen & (inputs != MASK_ID)].min() >= NUM_SPECIAL


def test_batches_depend_only_on_seed_and_step_and_pairs_are_framed():
    tokens = np.arange(NUM_SPECIAL, NUM_SPECIAL + 5000) % 300 + NUM_SPECIAL
    stage = MaskedLMStage(tokens, seq_len=32, seed=3, vocab_size=400, nsp=True)
    a = stage.batch(5, 0, 8, 8, torch.device("cpu"))
    b = stage.batch(5, 4, 4, 8, torch.device("cpu"))  # the second half of the same global batch
    assert torch.equal(a["input_ids"][4:], b["input_ids"]) and torch.equal(a["targets"][4:], b["targets"])
    assert not torch.equal(a["input_ids"], stage.batch(6, 0, 8, 8, torch.device("cpu"))["input_ids"])
    ids, types, random_next = stage.sequences(tokens, np.random.default_rng(0), 200)
    for row, kind, follows in zip(ids, types, random_next):
        seps = np.flatnonzero(row == SEP)
        assert row[0] == CLS and len(seps) == 2 and seps[1] == 31
        assert (kind[:seps[0] + 1] == 0).all() and (kind[seps[0] + 1:] == 1).all()
        a_last, b_first = row[seps[0] - 1], row[seps[0] + 1]
        if not follows:  # the stream counts up: B continues A
            assert b_first == (a_last - NUM_SPECIAL + 1) % 300 + NUM_SPECIAL
    assert 0.35 < random_next.mean() < 0.65


def test_an_encoder_learns_to_fill_in_masked_tokens():
    """Every token appears twice in a row, so a masked token is its neighbour: after 120 steps most are
    recovered (random text otherwise: ln 20 = 3.0 nats is the best a model that ignores context can do).
    RoPE, as relative positions find the neighbour sooner than learned absolute ones."""
    torch.manual_seed(0)
    tokens = np.repeat(np.random.default_rng(0).integers(20, 40, size=3200), 2)
    stage = MaskedLMStage(tokens, seq_len=24, seed=0, vocab_size=40, val_tokens=tokens[:2000], nsp=True)
    model = DecoderLM(preset("bert-tiny", vocab_size=40, max_seq_len=24, position="rope", head="mlm+nsp"))
    runtime = Runtime.resolve("cpu", "fp32")
    before = stage.evaluate(model, runtime, 24 * 32, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(120):
        loss = stage.loss(model, stage.batch(step, 0, 32, 32, torch.device("cpu")))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = stage.evaluate(model, runtime, 24 * 32, 16)
    assert set(stage.pop_metrics()) == {"mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy"}
    assert after["val_loss"] < min(before["val_loss"], 3.0) / 1.8 and after["val_mlm_accuracy"] > 0.5
    assert 0.0 <= after["val_nsp_accuracy"] <= 1.0


def test_bad_settings_are_refused():
    tokens = np.arange(100) + NUM_SPECIAL
    with pytest.raises(ValueError, match="two sequences"):
        MaskedLMStage(tokens, seq_len=64, seed=0, vocab_size=200)
    with pytest.raises(ValueError, match="rate"):
        MaskedLMStage(tokens, seq_len=16, seed=0, vocab_size=200, rate=1.5)
