"""Heads on one backbone: a reward model is the language model's backbone with a scalar head."""

from __future__ import annotations

import pytest
import torch

from lmforge.checkpoint import load_model, save_checkpoint
from lmforge.errors import InputError
from lmforge.model import DecoderLM, preset
from lmforge.model.heads import last_token_scores, with_head


@pytest.fixture
def lm() -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(preset("tiny", vocab_size=64, max_seq_len=32)).eval()


def test_score_head_shares_the_backbone(lm):
    reward = with_head(lm, "score").eval()
    assert reward.config.head == "score" and reward.score is not None and lm.score is None
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(reward(ids, return_hidden=True), lm(ids, return_hidden=True))
        scores = reward(ids)
    assert scores.shape == (2, 9)
    torch.testing.assert_close(scores, reward(ids, return_hidden=True) @ reward.score.weight[0])
    back = with_head(reward, "lm").eval()
    with torch.no_grad():
        assert torch.equal(back(ids), lm(ids))  # the language-model head's weights travelled along
    with pytest.raises(InputError, match="head=.nope."):
        preset("tiny", head="nope")


def test_last_token_scores_ignore_padding_and_survive_a_checkpoint(lm, tmp_path):
    reward = with_head(lm, "score").eval()
    rows = [[5, 9, 2, 7], [3, 3, 8, 1, 4, 6]]
    padded = torch.tensor([row + [0] * (6 - len(row)) for row in rows])
    with torch.no_grad():
        scores = last_token_scores(reward, padded, torch.tensor([4, 6]))
        alone = [reward(torch.tensor([row]))[0, -1] for row in rows]
    torch.testing.assert_close(scores, torch.stack(alone))
    loaded = load_model(save_checkpoint(tmp_path / "rm", reward))
    assert loaded.config.head == "score"
    with torch.no_grad():
        torch.testing.assert_close(last_token_scores(loaded, padded, torch.tensor([4, 6])), scores)
    with pytest.raises(ValueError, match="lengths"):
        last_token_scores(reward, padded, torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="'lm' head"):
        last_token_scores(lm, padded, torch.tensor([4, 6]))


def test_a_reward_model_is_refused_where_a_language_model_is_needed(lm, tmp_path):
    import lmforge
    from lmforge.interop.convert import export_checkpoint

    path = save_checkpoint(tmp_path / "rm", with_head(lm, "score"))
    with pytest.raises(InputError, match="reward model"):
        lmforge.load(path)
    with pytest.raises(InputError, match="not to GGUF"):
        export_checkpoint(path, tmp_path / "out.gguf", "gguf")


@pytest.mark.parametrize("tied", [True, False])
def test_reward_model_exports_as_sequence_classification_with_the_same_scores(tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    from lmforge.interop.convert import export_checkpoint

    torch.manual_seed(0)
    reward = with_head(DecoderLM(preset("tiny", vocab_size=64, max_seq_len=32, tie_embeddings=tied)), "score").eval()
    with torch.no_grad():
        reward.score.weight.normal_()  # a head that tells rows apart
    out = export_checkpoint(save_checkpoint(tmp_path / "rm", reward), tmp_path / "hf", "hf")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    hf.config.pad_token_id = 0  # (a checkpoint saved with its tokenizer writes it; this one has none)
    lengths = torch.tensor([10, 7, 4])
    ids = torch.randint(1, 64, (3, 10)) * (torch.arange(10) < lengths[:, None])  # right-padded with 0
    with torch.no_grad():
        theirs = hf(ids).logits[:, 0]  # (B,): the score at each row's last non-padding token
        ours = last_token_scores(reward, ids, lengths)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
