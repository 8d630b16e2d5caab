"""Fixtures shared by several test folders."""

from __future__ import annotations

import pytest
import torch

from lmforge.api import LanguageModel
from lmforge.model import DecoderLM, preset
from lmforge.runtime import Runtime
from lmforge.tokenizer import SPECIAL_IDS, train_tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
        '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}} [1, 2, 3] true false null. ') * 30


@pytest.fixture(scope="session")
def tiny_lm() -> LanguageModel:
    """A random-weight tiny model with an lmforge BPE tokenizer and a 2048-token context (long answers
    for streaming and stop tests). Special tokens get logit 0 (never the top): its replies are text."""
    tokenizer = train_tokenizer([TEXT], 400, progress=False)
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=2048, tie_embeddings=False)).eval()
    with torch.no_grad():  # its replies are text: special tokens (left out of reply text) get logit 0, never the top
        model.lm_head.weight[list(SPECIAL_IDS.values())] = 0.0
    return LanguageModel(model, tokenizer, Runtime.resolve("cpu", "fp32"))


@pytest.fixture
def store(tmp_path):
    """An empty human-ratings database (lmforge.eval.human.RatingStore) in the test's folder."""
    from lmforge.eval.human import RatingStore

    store = RatingStore(tmp_path / "ratings.sqlite")
    yield store
    store.close()


@pytest.fixture
def interrupt(monkeypatch):
    """``interrupt(StageClass, step)``: the stage's ``batch`` raises KeyboardInterrupt at ``step`` (a run stopped
    by Ctrl-C right after the checkpoint before it) until ``interrupt.release()``, which restores it."""
    originals = []

    def stop(stage_cls, at: int) -> None:
        original = stage_cls.batch
        originals.append((stage_cls, "batch", original))

        def batch(self, step, *args, **kwargs):
            if step == at:
                raise KeyboardInterrupt
            return original(self, step, *args, **kwargs)

        monkeypatch.setattr(stage_cls, "batch", batch)

    def release() -> None:
        while originals:
            monkeypatch.setattr(*originals.pop())

    stop.release = release
    return stop
