"""Sentence embeddings: the packaged all-MiniLM-L6-v2 gives sentence-transformers' vectors."""

from __future__ import annotations

import numpy as np
import pytest

from lmforge.embed import load
from lmforge.errors import InputError
from lmforge.interop.packaged import packaged_model_path

TEXTS = ["How do I open a file?", "with open(path) as f: data = f.read()", "Le chat dort sur la table.",
         "机器学习是人工智能的一个分支。", "token " * 400, ""]  # a text past the 256-token limit, an empty one


@pytest.fixture(scope="module")
def minilm():
    return load("all-minilm-l6-v2", device="cpu")


def test_minilm_vectors_equal_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(packaged_model_path("all-minilm-l6-v2")), device="cpu")
    theirs = reference.encode(TEXTS, convert_to_numpy=True)
    ours = minilm.encode(TEXTS, batch_size=4)
    assert (minilm.pooling, minilm.normalize, minilm.max_tokens) == ("mean", True, 256)  # read from its folder
    assert ours.shape == (len(TEXTS), 384) and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_vectors_do_not_depend_on_the_batch(minilm):
    together = minilm.encode(TEXTS, batch_size=len(TEXTS))
    alone = np.stack([minilm.encode(text) for text in TEXTS])
    assert np.abs(together - alone).max() < 1e-5
    assert minilm.encode([]).shape == (0, 384)


def test_similar_texts_are_closer(minilm):
    a, b, c = minilm.encode(["How do I read a file in Python?", "Reading the contents of a file with Python",
                             "The recipe needs two eggs and flour."])
    assert a @ b > a @ c + 0.3


def test_a_decoder_is_refused(tmp_path):
    from lmforge.checkpoint import model_state, write_checkpoint
    from lmforge.model import DecoderLM, preset

    model = DecoderLM(preset("tiny", vocab_size=50))
    write_checkpoint(tmp_path, model.config, model_state(model))
    with pytest.raises(InputError, match="encoder"):
        load(tmp_path, device="cpu")
