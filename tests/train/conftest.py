import numpy as np
import pytest

from lmforge.train import PretrainStage


@pytest.fixture
def pattern_stage():
    """A learnable token stream: a repeating pattern of 50 ids."""
    tokens = np.tile(np.arange(50), 400).astype(np.uint16)

    def make(seq_len: int = 16, seed: int = 0) -> PretrainStage:
        return PretrainStage(tokens, seq_len, seed, val_tokens=tokens[:2000], token_bytes=[1] * 64)

    return make
