"""Sampling filters on hand-made logits, seeded sampling, and SamplingConfig validation."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.infer.sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    argmax,
    make_generator,
    sample_next,
    top_k_filter,
    top_p_filter,
)


def kept(logits: torch.Tensor) -> list[set[int]]:
    """The token ids each row keeps (finite logits)."""
    return [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in logits]


def log_probs(*rows: list[float]) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in row] for row in rows])


def test_top_k_keeps_the_k_largest_per_row():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5], [4.0, -1.0, 0.0, 5.0]])
    assert kept(top_k_filter(logits, 2)) == [{1, 2}, {0, 3}]
    assert kept(top_k_filter(logits, 1)) == [{1}, {3}]
    assert kept(top_k_filter(logits, 0)) == [{0, 1, 2, 3}] * 2  # off
    assert torch.equal(top_k_filter(logits, 2)[0, [1, 2]], logits[0, [1, 2]])  # kept logits unchanged


@pytest.mark.parametrize("p, expected", [
    (0.3, {0}),  # the top token alone (0.5) already reaches p
    (0.75, {0, 2}),  # 0.5 + 0.3 = 0.8 >= 0.75; 0.5 alone is not enough
    (0.9, {0, 2, 1}),  # 0.5 + 0.3 + 0.15 = 0.95
    (0.99, {0, 1, 2, 3}),
    (1e-9, {0}),  # always at least one token
    (1.0, {0, 1, 2, 3}),  # off
])
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    logits = log_probs([0.5, 0.15, 0.3, 0.05])
    assert kept(top_p_filter(logits, p)) == [expected]


def test_top_p_works_per_row():
    logits = log_probs([0.5, 0.15, 0.3, 0.05], [0.05, 0.9, 0.03, 0.02])
    assert kept(top_p_filter(logits, 0.75)) == [{0, 2}, {1}]


@pytest.mark.parametrize("scale", [12.0, 0.5])  # a peaked distribution (nucleus in the 64 likeliest), a flat one
def test_top_p_over_a_large_vocabulary_equals_a_full_sort(scale):
    torch.manual_seed(0)
    logits = torch.randn(3, 5000) * scale
    for p in (0.5, 0.9, 0.99):
        ranked, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(ranked, dim=-1)
        keep_ranked = (probs.cumsum(-1) - probs) < p
        expected = [set(order[row][keep_ranked[row]].tolist()) for row in range(3)]
        assert kept(top_p_filter(logits, p)) == expected


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[0, 1, 1], [3, 3, 3]])  # repeats count once
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0], [2.0, -1.0, 0.5, 1.5]]
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_greedy_takes_argmax_after_the_penalty():
    logits = torch.tensor([[3.0, 2.0, -1.0]])
    config = SamplingConfig(temperature=0, repetition_penalty=2.0)
    assert sample_next(logits, config).tolist() == [0]
    assert sample_next(logits, config, seen_ids=torch.tensor([[0]])).tolist() == [1]  # 3/2 < 2


def test_argmax_equals_torch_on_ties_nan_and_every_shape():
    torch.manual_seed(0)
    logits = torch.randn(5, 1000).round(decimals=1)  # many ties: the first index of the largest wins
    logits[3, 17] = float("nan")  # NaN counts as the largest, as in torch.argmax
    for case in (logits, logits[1], logits[None], logits[:, ::2], logits.bfloat16(), logits.requires_grad_()):
        got = argmax(case)
        assert got.dtype == torch.long and torch.equal(got, case.argmax(dim=-1)), case.shape


def test_sampling_stays_inside_the_filtered_set():
    logits = log_probs(*[[0.3, 0.25, 0.2, 0.15, 0.1]] * 500)  # 500 identical rows, one draw each
    generator = make_generator(0)
    draws = set(sample_next(logits, SamplingConfig(top_k=2), generator).tolist())
    assert draws == {0, 1}
    draws = set(sample_next(logits, SamplingConfig(top_p=0.7), generator).tolist())
    assert draws == {0, 1, 2}  # 0.3 + 0.25 < 0.7 <= 0.75


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    logits = torch.zeros(64, 100)  # flat: every draw is a fair 1-in-100 choice
    config = SamplingConfig(temperature=0.7)

    def draw(seed: int) -> list[int]:
        return sample_next(logits, config, make_generator(seed)).tolist()

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_low_temperature_concentrates_on_the_top_token():
    logits = torch.tensor([[1.0, 0.9, 0.0]] * 200)
    hot = sample_next(logits, SamplingConfig(temperature=5.0), make_generator(0))
    cold = sample_next(logits, SamplingConfig(temperature=0.01), make_generator(0))
    assert (cold == 0).all()
    assert (hot != 0).sum() > 50


@pytest.mark.parametrize("settings, message", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(stop="\n"), "list of strings"),
    (dict(stop=[""]), "non-empty"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=4, temperature=0.8), "beam search is deterministic"),
    (dict(num_beams=4, temperature=0, top_k=5), "beam search is deterministic"),
])
def test_bad_settings_raise_value_error(settings, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**settings)


def test_good_settings_pass():
    SamplingConfig(max_new_tokens=1, temperature=0, top_k=5, top_p=0.9, repetition_penalty=1.3, stop=["\n"],
                   stop_token_ids=[0], seed=3, num_beams=1)
    SamplingConfig(temperature=0, num_beams=4, length_penalty=0.6)


@pytest.mark.parametrize("bad", [{"seed": 1.5}, {"seed": -1}, {"max_new_tokens": "4"}, {"top_k": True},
                                 {"temperature": float("nan")}, {"top_p": "0.9"}, {"stop": "x"},
                                 {"stop": 7}, {"stop_token_ids": [2**40]}])
def test_sampling_settings_from_a_file_or_a_request_are_type_checked(bad):
    """A prompts file for `generate --input` carries its own settings: a float seed reached torch's
    manual_seed (a RuntimeError) before this check."""
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingConfig(**bad)
