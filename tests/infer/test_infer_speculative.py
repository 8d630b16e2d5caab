"""Speculative and prompt-lookup decoding: the same tokens as the model alone (greedy), the model's own
distribution (sampling), fewer passes when the guesses are good."""

from __future__ import annotations

import pytest
import torch

from lmforge.infer.generate import generate_tokens
from lmforge.infer.sampling import SamplingConfig
from lmforge.infer.speculative import (
    DraftModel,
    FirstGuesses,
    PromptLookup,
    SpeculativeStats,
    distribution,
    speculative_tokens,
)
from lmforge.model import DecoderLM, preset


def small(vocab: int, seed: int, layers: int = 2) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(preset("tiny", vocab_size=vocab, num_layers=layers, max_seq_len=256)).eval()


@pytest.mark.parametrize("drafter", ["lookup", "other model", "itself", "first layer", "lookup, then a model"])
def test_greedy_output_equals_the_model_alone(tiny_lm, drafter):
    model = tiny_lm.model
    make = {"lookup": lambda: PromptLookup(ngram=3),
            "other model": lambda: DraftModel(small(model.config.vocab_size, seed=7)),
            "itself": lambda: DraftModel(model),
            "first layer": lambda: DraftModel.first_layers(model, 1),
            "lookup, then a model": lambda: FirstGuesses([PromptLookup(ngram=3, min_ngram=3),
                                                          DraftModel(small(model.config.vocab_size, seed=7))])
            }[drafter]
    config = SamplingConfig(max_new_tokens=40, temperature=0.0)
    for text in ("The quick brown fox", "Paris is the capital of France. Paris is", "[1, 2, 3] true"):
        prompt = tiny_lm.encode_prompt(text)
        alone = list(generate_tokens(model, prompt, config))
        stats = SpeculativeStats()
        assert list(speculative_tokens(model, prompt, config, make(), draft_tokens=4, stats=stats)) == alone
        assert stats.tokens == len(alone) and stats.accepted <= stats.drafted
        if drafter == "itself":  # every guess is right: 5 tokens a pass
            assert stats.acceptance == 1.0 and stats.passes == -(-len(alone) // 5)
    if drafter == "first layer":  # a view over the model's own weights, one block deep
        draft = make().model
        assert len(draft.blocks) == 1 and draft.blocks[0] is model.blocks[0] and len(model.blocks) > 1
        assert draft.lm_head is model.lm_head and draft.config.num_layers == 1
    stop = alone[10]  # a stop token ends the output before it, as without speculation
    config = SamplingConfig(max_new_tokens=40, temperature=0.0, stop_token_ids=[stop])
    assert list(speculative_tokens(model, prompt, config, make())) == list(generate_tokens(model, prompt, config))


def test_first_guesses_asks_the_next_drafter_only_when_the_first_has_none():
    class Fixed:
        def __init__(self, guesses, log):
            self.guesses, self.log = guesses, log

        def propose(self, tokens, count, config, generator):
            self.log.append(len(tokens))
            return self.guesses[:count], None

        def reset(self):
            self.log.append("reset")

        def fork(self):
            return Fixed(self.guesses, self.log)

    first_log, second_log = [], []
    chain = FirstGuesses([Fixed([], first_log), Fixed([7, 8, 9], second_log)])
    assert chain.propose([1, 2], 2, SamplingConfig(temperature=0), None) == ([7, 8], None)
    assert first_log == [2] and second_log == [2]
    chain = FirstGuesses([Fixed([5], first_log), Fixed([7], second_log)]).fork()
    assert chain.propose([1, 2, 3], 4, SamplingConfig(temperature=0), None) == ([5], None)
    assert second_log == [2]  # not asked
    chain.reset()
    assert first_log[-1] == second_log[-1] == "reset"


def test_prompt_lookup_guesses_what_followed_the_latest_match():
    lookup = PromptLookup(ngram=2)
    greedy = SamplingConfig(temperature=0.0)
    assert lookup.propose([5, 6, 7, 8, 5, 6, 9, 5, 6], 3, greedy, None) == ([9, 5, 6], None)  # latest "5 6"
    assert lookup.propose([1, 2, 3, 4, 9, 4], 2, greedy, None) == ([9, 4], None)  # no "9 4" before: "4" alone
    assert lookup.propose([1, 2, 3], 2, greedy, None) == ([], None)
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookup(ngram=1, min_ngram=2)


@pytest.mark.parametrize("drafter", ["other model", "lookup"])
def test_sampled_tokens_follow_the_models_distribution(drafter):
    """The first two tokens of 3000 speculative samples (temperature 1.3, top-k 6, a vocabulary of 8): their
    joint frequencies against the model's exact p(t1) p(t2 | t1). A drafter from another random model is
    often wrong, so rejections and corrections are exercised; prompt lookup's guesses are certain ones."""
    target, vocab = small(8, seed=1), 8
    prompt = [4, 0, 6, 4, 0]  # prompt lookup guesses 6 (p = 0.13 at the first place)
    config = SamplingConfig(max_new_tokens=2, temperature=1.3, top_k=6)
    with torch.no_grad():
        first = distribution(target(torch.tensor([prompt]))[0, -1:].float(), config)[0]
        exact = torch.zeros(vocab, vocab)
        for t1 in range(vocab):
            second = distribution(target(torch.tensor([prompt + [t1]]))[0, -1:].float(), config)[0]
            exact[t1] = first[t1] * second
    make = (lambda: DraftModel(small(8, seed=2))) if drafter == "other model" else (lambda: PromptLookup(ngram=2))
    counts, stats, samples = torch.zeros(vocab, vocab), SpeculativeStats(), 3000
    draft = make()
    for seed in range(samples):
        t1, t2 = speculative_tokens(target, prompt, SamplingConfig(**{**config.__dict__, "seed": seed}), draft,
                                    draft_tokens=2, stats=stats)
        counts[t1, t2] += 1
    distance = 0.5 * (counts / samples - exact).abs().sum()
    assert distance < 0.06, (distance, stats)
    assert 0 < stats.acceptance < 1  # some guesses kept, some rejected


def test_the_api_and_the_command_line_speculate(tmp_path, tiny_lm, capsys):
    import dataclasses

    from lmforge.api import load
    from lmforge.checkpoint import model_state, write_checkpoint
    from lmforge.cli import main
    from lmforge.errors import InputError
    from lmforge.tokenizer import train_tokenizer

    looked = dataclasses.replace(tiny_lm, drafter=PromptLookup(), speculative_stats=SpeculativeStats())
    for prompt in ("Paris is the capital of France. Paris", "true false null. true"):
        assert looked.generate(prompt, max_new_tokens=30, temperature=0) == \
               tiny_lm.generate(prompt, max_new_tokens=30, temperature=0)
        assert "".join(looked.stream(prompt, max_new_tokens=30, temperature=0)) == \
               tiny_lm.generate(prompt, max_new_tokens=30, temperature=0)
    assert looked.speculative_stats.accepted > 0  # the random model repeats itself: lookup guesses right
    with pytest.raises(ValueError, match="penalties"):
        looked.generate("x", repetition_penalty=1.2)
    with pytest.raises(ValueError, match="beam search"):
        looked.generate("x", num_beams=2, temperature=0)

    write_checkpoint(tmp_path / "m", tiny_lm.model.config, model_state(tiny_lm.model), tiny_lm.tokenizer)
    drafted = load(tmp_path / "m", device="cpu", dtype="fp32", draft=tmp_path / "m", draft_tokens=3)
    assert isinstance(drafted.drafter, DraftModel) and drafted.draft_tokens == 3
    assert drafted.generate("The quick brown fox", max_new_tokens=20, temperature=0) == \
           tiny_lm.generate("The quick brown fox", max_new_tokens=20, temperature=0)
    assert drafted.speculative_stats.acceptance == 1.0  # the draft is the model itself
    other = train_tokenizer(["a completely different text for another vocabulary " * 40], 300, progress=False)
    write_checkpoint(tmp_path / "o", dataclasses.replace(tiny_lm.model.config, vocab_size=other.vocab_size),
                     model_state(DecoderLM(dataclasses.replace(tiny_lm.model.config, vocab_size=other.vocab_size))),
                     other)
    with pytest.raises(InputError, match="another tokenizer"):
        load(tmp_path / "m", device="cpu", dtype="fp32", draft=tmp_path / "o")

    plain = ["generate", str(tmp_path / "m"), "Paris is the capital", "--max-new-tokens", "24", "--temperature", "0",
             "--device", "cpu", "--dtype", "fp32"]
    assert main(plain) == 0
    alone = capsys.readouterr()
    assert main([*plain, "--prompt-lookup", "--draft-tokens", "3"]) == 0
    looked_up = capsys.readouterr()
    assert looked_up.out == alone.out and "guesses kept" in looked_up.err and "guesses kept" not in alone.err
    assert main([*plain, "--prompt-lookup", "--draft", str(tmp_path / "m"), "--draft-tokens", "3"]) == 0
    both = capsys.readouterr()  # lookup where it matches, the draft model elsewhere
    assert both.out == alone.out and "guesses kept" in both.err
    assert main([*plain, "--draft-layers", "1", "--draft", str(tmp_path / "m")]) == 2  # one draft model at a time

    # the batched engine (generate_batch, generate --input) speculates per request, with the same output
    prompts = ["Paris is the capital of France. Paris", "true false null. true", "The quick brown fox"]
    assert [c.text for c in looked.generate_batch(prompts, max_new_tokens=30, temperature=0)] == \
           [c.text for c in tiny_lm.generate_batch(prompts, max_new_tokens=30, temperature=0)]
    assert looked.engine().stats.accepted > 0 and tiny_lm.engine().stats.drafted == 0
    penalised = looked.generate_batch(prompts[:1], max_new_tokens=5, repetition_penalty=1.3)  # decodes plainly
    assert penalised[0].completion_tokens == 5
    (tmp_path / "in.jsonl").write_text("".join(f'{{"prompt": "{p}"}}\n' for p in prompts))
    batch = ["generate", str(tmp_path / "m"), "--input", str(tmp_path / "in.jsonl"), "--max-new-tokens", "24",
             "--temperature", "0", "--device", "cpu", "--dtype", "fp32"]
    assert main(batch) == 0
    alone = capsys.readouterr()
    assert main([*batch, "--prompt-lookup"]) == 0
    looked_up = capsys.readouterr()
    assert looked_up.out == alone.out and "guesses kept" in looked_up.err and "guesses kept" not in alone.err
