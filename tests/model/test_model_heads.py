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
    with pytest.raises(InputError, match="reward model"):
        export_checkpoint(path, tmp_path / "out", "hf")
