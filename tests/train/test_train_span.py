"""Span corruption (T5): inputs and targets that give back the text exactly, T5's proportions, batches
fixed by (seed, step), and an encoder-decoder that learns to fill the spans in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.model import build_model, preset
from lmforge.runtime import Runtime
from lmforge.train.span import (
    EOS,
    SpanCorruptionStage,
    corrupt,
    noise_mask,
    reconstruct,
    sentinel_ids,
    span_counts,
)


@settings(max_examples=300, deadline=None)
@given(length=st.integers(2, 400), density=st.floats(0.01, 0.99), mean_span=st.floats(1.0, 12.0),
       seed=st.integers(0, 2**32 - 1))
def test_inputs_and_targets_reconstruct_the_text_exactly(length, density, mean_span, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 30000, size=length).tolist()
    ids[rng.integers(length)] = EOS  # packed documents: an end-of-text inside the text
    mask = noise_mask(length, density, mean_span, rng)
    hidden, runs = span_counts(length, density, mean_span)
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    assert mask.sum() == hidden and starts.sum() == runs and not mask[0]  # a kept run comes first
    sentinels = sentinel_ids(32000, runs)
    inputs, targets = corrupt(ids, mask, sentinels)
    assert len(inputs) == length - hidden + runs + 1 and len(targets) == hidden + runs + 1
    assert inputs[-1] == targets[-1] == EOS and [t for t in targets if t in sentinels] == sentinels
    assert reconstruct(inputs, targets, sentinels) == ids


def test_hidden_runs_follow_the_mean_span_length_and_density():
    rng = np.random.default_rng(0)
    masks = np.stack([noise_mask(512, 0.15, 3.0, rng) for _ in range(200)])
    assert masks.mean() == pytest.approx(77 / 512)  # round(512 * 0.15) hidden in every window
    starts = masks & ~np.concatenate([np.zeros((200, 1), bool), masks[:, :-1]], axis=1)
    assert masks.sum() / starts.sum() == pytest.approx(77 / 26)  # round(77 / 3) runs
    # each part of a uniform composition has the mean total / parts: the first kept run (where the first
    # hidden one starts) and the last hidden run alike
    assert masks.argmax(1).mean() == pytest.approx(435 / 26, rel=0.15)
    last_hidden = np.flip(~masks, axis=1).argmax(1)  # the window ends with a hidden run
    assert last_hidden.mean() == pytest.approx(77 / 26, rel=0.15)


def test_batches_depend_only_on_seed_and_step():
    tokens = np.arange(16, 5016) % 300 + 16
    stage = SpanCorruptionStage(tokens, 40, seed=3, sentinels=sentinel_ids(400))
    a = stage.batch(5, 0, 8, 8, torch.device("cpu"))
    b = stage.batch(5, 4, 4, 8, torch.device("cpu"))  # the second half of the same global batch
    assert torch.equal(a["input_ids"][4:], b["input_ids"]) and torch.equal(a["targets"][4:], b["targets"])
    assert not torch.equal(a["input_ids"], stage.batch(6, 0, 8, 8, torch.device("cpu"))["input_ids"])
    assert a["input_ids"].shape == (8, 40 - 6 + 2 + 1) and a["targets"].shape == (8, 6 + 2 + 1)


def test_an_encoder_decoder_learns_to_fill_in_spans():
    """A stream that counts up by one: a hidden span is known from the token before it. After 150 steps
    most target tokens are right (guessing is about 1 in 40)."""
    torch.manual_seed(0)
    tokens = (np.arange(6000) % 40 + 16).astype(np.uint16)
    sentinels = sentinel_ids(64, 10)
    stage = SpanCorruptionStage(tokens, 24, seed=0, sentinels=sentinels, val_tokens=tokens[:2000])
    model = build_model(preset("t5-tiny", vocab_size=64, max_seq_len=24))
    runtime = Runtime.resolve("cpu", "fp32")
    before = stage.evaluate(model, runtime, 24 * 32, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(150):
        loss = stage.loss(model, stage.batch(step, 0, 32, 32, torch.device("cpu")))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = stage.evaluate(model, runtime, 24 * 32, 16)
    assert set(stage.pop_metrics()) == {"span_accuracy"}
    assert after["val_loss"] < before["val_loss"] / 3 and after["val_span_accuracy"] > 0.8


def test_bad_settings_are_refused():
    tokens = np.arange(100) + 16
    with pytest.raises(ValueError, match="noise_density"):
        SpanCorruptionStage(tokens, 16, 0, sentinel_ids(200), noise_density=1.0)
    with pytest.raises(ValueError, match="mean_span_length"):
        SpanCorruptionStage(tokens, 16, 0, sentinel_ids(200), mean_span_length=0.5)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        SpanCorruptionStage(tokens, 200, 0, sentinel_ids(300))
    with pytest.raises(ValueError, match="more than the 2 sentinel"):
        SpanCorruptionStage(tokens, 90, 0, sentinel_ids(200, 2), mean_span_length=1.0)
