"""Speculative decoding in the batched engine: rows with a drafter give the tokens (greedy) and the
distribution (sampled) of plain decoding, in fewer passes when the guesses are good, beside rows
that do not speculate."""

from __future__ import annotations

import pytest
import torch

from lmforge.infer.engine import Engine
from lmforge.infer.request import Request
from lmforge.infer.sampling import SamplingConfig
from lmforge.infer.speculative import DraftModel, PromptLookup, distribution
from lmforge.model.packed import available as packing_helps

PROMPTS = [[1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [5, 6, 7, 5, 6, 7, 5], [9, 10, 11, 12, 13], [3, 3, 3, 3], [7]]


def greedy(n: int = 24, **extra) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=n, temperature=0, **extra)


def drafters(model, make_model):
    other = make_model(seed=5, num_layers=1, vocab_size=model.config.vocab_size)
    return {"lookup": lambda: PromptLookup(ngram=2), "other model": lambda: DraftModel(other),
            "itself": lambda: DraftModel(model), "first layer": lambda: DraftModel.first_layers(model, 1)}


@pytest.mark.parametrize("kind", ["lookup", "other model", "itself", "first layer"])
def test_greedy_rows_that_speculate_decode_as_plain_rows(make_model, byte_tokenizer, kind):
    """Every other row speculates; all rows match plain decoding token for token, with log-probs, stop
    tokens and stop strings cut in the same places (a stop may fall inside a run of kept guesses)."""
    model = make_model(vocab_size=258)
    make = drafters(model, make_model)[kind]
    plain = Engine(model, max_batch_size=5).generate(
        [Request(p, greedy(), logprobs=2, decode=byte_tokenizer.decode) for p in PROMPTS])
    stop_token = plain[0].token_ids[9]  # the first row stops at its tenth token
    text = byte_tokenizer.decode(plain[1].token_ids)
    stop_string = text[len(text) // 2:len(text) // 2 + 2]  # the second row stops half-way
    configs = [greedy(stop_token_ids=[stop_token]), greedy(stop=[stop_string])] + [greedy()] * 3
    engine = Engine(model, max_batch_size=5)
    requests = [Request(p, c, logprobs=2, decode=byte_tokenizer.decode,
                        drafter=make() if i % 2 == 0 or kind == "itself" else None, draft_tokens=3)
                for i, (p, c) in enumerate(zip(PROMPTS, configs))]
    fast = engine.generate(requests)
    alone = Engine(model, max_batch_size=5).generate(
        [Request(p, c, logprobs=2, decode=byte_tokenizer.decode) for p, c in zip(PROMPTS, configs)])
    for got, want in zip(fast, alone):
        assert (got.token_ids, got.text, got.finish_reason, got.stop_token_id) == \
            (want.token_ids, want.text, want.finish_reason, want.stop_token_id)
        assert [e.token_id for e in got.logprobs] == [e.token_id for e in want.logprobs]
        assert [e.logprob for e in got.logprobs] == pytest.approx([e.logprob for e in want.logprobs], abs=1e-4)
        assert [[t for t, _ in e.top] for e in got.logprobs] == [[t for t, _ in e.top] for e in want.logprobs]
    assert fast[0].finish_reason == "stop" and fast[0].stop_token_id == stop_token
    assert fast[1].finish_reason == "stop" and stop_string not in fast[1].text
    assert 0 <= engine.stats.accepted <= engine.stats.drafted and engine.stats.drafted > 0
    if kind == "itself":  # a drafter that is the model is always right: 4 tokens a pass for every row
        assert engine.stats.accepted == engine.stats.drafted
        assert engine.stats.decode_steps <= -(-23 // 4) + 1


def test_a_slot_keeps_only_the_kept_tokens_for_the_prefix_cache(make_model):
    """Rejected guesses leave keys past the slot's length; a later prompt that continues the finished
    text reuses the slot's positions and still decodes as plain decoding."""
    model = make_model()
    other = make_model(seed=5, num_layers=1)  # a poor drafter: many guesses rejected
    engine = Engine(model, max_batch_size=2)
    first = engine.generate([Request(PROMPTS[2], greedy(16), drafter=DraftModel(other), draft_tokens=4)])[0]
    assert engine.stats.accepted < engine.stats.drafted
    follow = PROMPTS[2] + first.token_ids + [8]
    again = engine.generate([Request(follow, greedy(12), drafter=DraftModel(other))])[0]
    plain = Engine(model, max_batch_size=1).generate([Request(follow, greedy(12))])[0]
    assert again.cached_tokens >= len(PROMPTS[2]) + 15 and again.token_ids == plain.token_ids


@pytest.mark.parametrize("kind", ["other model", "lookup"])
def test_sampled_rows_follow_the_models_distribution(make_model, kind):
    """1200 requests decode three tokens each (temperature 1.3, top-k 6, a vocabulary of 8), 16 rows at a
    time; the first comes from the prefill, the next two from one speculative pass (one guess, and the
    model's token after it or in its place). The frequencies of (t2, t3) against the model's exact
    sum over t1 of p(t1) p(t2 | t1) p(t3 | t1 t2): a chi-square test."""
    model, vocab = make_model(seed=1, vocab_size=8), 8
    prompt = [4, 0, 6, 4, 0]  # prompt lookup guesses from the earlier "4 0 6"

    def p(ids: list[int]) -> torch.Tensor:
        return distribution(model(torch.tensor([ids]))[0, -1:].float(), config)[0]
    config = SamplingConfig(max_new_tokens=3, temperature=1.3, top_k=6)
    exact = torch.zeros(vocab, vocab)
    with torch.no_grad():
        for t1, p1 in enumerate(p(prompt).tolist()):
            for t2, p2 in enumerate(p(prompt + [t1]).tolist()):
                if p1 * p2 > 0:
                    exact[t2] += p1 * p2 * p(prompt + [t1, t2])
    draft = make_model(seed=2, vocab_size=8, num_layers=1)
    make = (lambda: DraftModel(draft)) if kind == "other model" else (lambda: PromptLookup(ngram=2))
    samples, engine = 1200, Engine(model, max_batch_size=16)
    done = engine.generate([Request(prompt, SamplingConfig(**{**config.__dict__, "seed": seed}), drafter=make(),
                                    draft_tokens=1) for seed in range(samples)])
    counts = torch.zeros(vocab, vocab)
    for completion in done:
        counts[completion.token_ids[1], completion.token_ids[2]] += 1
    expected = exact * samples
    keep = expected >= 5  # the cells with enough mass for the chi-square law
    chi2 = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    assert chi2 < 2.0 * int(keep.sum()) + 20, chi2  # ~3.5 sigma above the mean of the chi-square law
    assert counts[~keep].sum() <= expected[~keep].sum() * 3 + 10
    assert 0 < engine.stats.accepted < engine.stats.drafted


class EvenTokens:
    """A constraint: even token ids only."""

    def allowed(self, remaining: int | None = None) -> torch.Tensor:
        return torch.arange(64) % 2 == 0

    def advance(self, token_id: int) -> None:
        pass


def test_requests_speculation_cannot_keep_exact_are_refused(make_model):
    model = make_model()
    engine = Engine(model, max_batch_size=2)
    with pytest.raises(ValueError, match="penalties"):
        engine.add(Request([1, 2], greedy(repetition_penalty=1.2), drafter=PromptLookup()))
    with pytest.raises(ValueError, match="constraint"):
        engine.add(Request([1, 2], greedy(), drafter=PromptLookup(),
                           constraint=EvenTokens()))
    with pytest.raises(ValueError, match="draft_tokens"):
        engine.add(Request([1, 2], greedy(), drafter=PromptLookup(), draft_tokens=0))


@pytest.mark.slow
def test_a_compiled_step_runs_the_speculative_steps_without_recompiling(make_model, config_patches):
    """Speculative steps have the fixed shape (B, 1 + k): warm_up(draft_tokens=k) compiles them beside the
    one-token steps, and speculating rows then decode as the eager engine's plain rows."""
    from torch._dynamo.utils import counters

    from lmforge.infer import CompiledDecodeStep

    model = make_model()
    plain = Engine(model, max_batch_size=2).generate([Request(p, greedy(20)) for p in PROMPTS[:3]])
    engine = Engine(model, max_batch_size=2, decode_step=CompiledDecodeStep(model, max_autotune=False),
                    decode_buckets=[2])  # one batch size: two graphs (widths 1 and 4) to compile
    engine.warm_up(draft_tokens=3)
    compiled_before = counters["stats"]["unique_graphs"]
    with config_patches() as patches:
        fast = engine.generate([Request(p, greedy(20), drafter=d, draft_tokens=3)
                                for p, d in zip(PROMPTS[:3], [PromptLookup(2), DraftModel(model), None])])
    assert counters["stats"]["unique_graphs"] == compiled_before
    assert patches.call_count == 0  # no recompiling: every call ran its graph as it was (CompiledDecodeStep._run)
    assert [c.token_ids for c in fast] == [c.token_ids for c in plain]
    assert engine.stats.accepted > 0


@pytest.mark.slow
def test_a_draft_model_with_a_compiled_step_guesses_as_the_eager_one(make_model, monkeypatch):
    """A draft's one-token forwards through its compiled step: the same guesses as the eager draft while the
    sequence grows and rejected guesses are cropped away, one graph for it all, the tokens kept since the last
    guesses caught up through it too (only the prompt runs eagerly), and the engine's output exact."""
    from torch._dynamo.utils import counters

    from lmforge.infer import CompiledDecodeStep, speculative

    eager_passes = []
    eager_forward = speculative._forward
    monkeypatch.setattr(speculative, "_forward", lambda model, ids, *rest, **kw: eager_passes.append(len(ids)) or
                        eager_forward(model, ids, *rest, **kw))

    model, small = make_model(), make_model(seed=3, num_layers=1)
    eager = DraftModel(small)
    compiled = DraftModel(small, decode_step=CompiledDecodeStep(small, max_autotune=False))
    tokens, before = list(PROMPTS[0]), counters["stats"]["unique_graphs"]
    for turn in range(4):  # two guesses kept and one of the model's own each round, as in decoding
        guesses = eager.propose(tokens, 4, greedy(), None)[0]
        eager_passes.clear()
        assert compiled.propose(tokens, 4, greedy(), None)[0] == guesses
        assert eager_passes == ([len(PROMPTS[0])] if turn == 0 else [])
        if turn == 0:
            graphs = counters["stats"]["unique_graphs"]
        tokens += guesses[:2] + [(guesses[2] + 1) % small.config.vocab_size]
    assert graphs > before  # the guesses came from the compiled graph ...
    assert counters["stats"]["unique_graphs"] == graphs  # ... and the cache's length is symbolic: no recompiles
    assert compiled.cache.max_len == small.config.max_seq_len  # allocated once at full length
    plain = Engine(model, max_batch_size=1).generate([Request(PROMPTS[1], greedy())])[0]
    fast = Engine(model, max_batch_size=1).generate(
        [Request(PROMPTS[1], greedy(), drafter=compiled.fork(), draft_tokens=3)])[0]
    assert fast.token_ids == plain.token_ids


def test_a_draft_model_with_a_shorter_context_stops_guessing_at_its_end(make_model):
    model = make_model()
    short = make_model(seed=3, num_layers=1, max_seq_len=16)  # the prompt (10) and 24 new tokens do not fit
    engine = Engine(model, max_batch_size=1)
    fast = engine.generate([Request(PROMPTS[0], greedy(), drafter=DraftModel(short), draft_tokens=4)])[0]
    assert fast.token_ids == Engine(model, max_batch_size=1).generate([Request(PROMPTS[0], greedy())])[0].token_ids
    assert engine.stats.drafted > 0
    assert len(DraftModel(short).propose(list(range(14)), 4, greedy(), None)[0]) == 2
    assert DraftModel(short).propose(list(range(16)), 4, greedy(), None) == ([], None)


class Recording(PromptLookup):
    """Prompt lookup that notes where each guess would start and how many it was allowed."""

    def __init__(self, log: list):
        super().__init__(ngram=2)
        self.log = log

    def propose(self, tokens, count, config, generator):
        self.log.append((len(tokens), count))  # the pending token is at position len(tokens) - 1
        return super().propose(tokens, count, config, generator)

    def fork(self):
        return Recording(self.log)


def test_key_counts_come_in_whole_blocks_and_guesses_stay_in_one():
    from lmforge.infer.slot_cache import KEY_BLOCK, block_room, key_count

    assert [key_count(n, 100) for n in (1, KEY_BLOCK, KEY_BLOCK + 1, 99)] == [KEY_BLOCK, KEY_BLOCK, 2 * KEY_BLOCK, 100]
    assert block_room(0) == KEY_BLOCK - 1 and block_room(KEY_BLOCK - 1) == 0 and block_room(KEY_BLOCK + 3) == KEY_BLOCK - 4


def test_a_step_never_spans_two_key_blocks(make_model):
    """Guesses end at a key block's edge, so every checked token reads the keys its one-token step would."""
    from lmforge.infer.slot_cache import KEY_BLOCK

    model = make_model()
    log = []
    engine = Engine(model, max_batch_size=2)
    engine.generate([Request([1, 2, 1, 2, 1, 2, 1], greedy(40), drafter=Recording(log), draft_tokens=6),
                     Request([5, 6, 5, 6], greedy(40), drafter=Recording(log), draft_tokens=6)])
    assert log and engine.stats.drafted > 0
    for length, room in log:
        pending = length - 1
        assert (pending + room) // KEY_BLOCK == pending // KEY_BLOCK, (pending, room)
    assert any(room < 6 for _, room in log) and any(room == 6 for _, room in log)


@pytest.mark.skipif(not packing_helps(torch.bfloat16, "cpu"), reason="needs native bf16 (AVX-512 BF16/AMX)")
@pytest.mark.parametrize("kind", ["lookup", "itself"])
def test_bf16_speculation_gives_plain_decodings_logits_to_the_bit(make_model, kind):
    """In bf16 a checked guess's logits are those of the one-token step at its place, exactly: each row
    reads as many keys as that step would, and the packed products give a row the same bits whatever
    the rows beside it (the plain bf16 product of one row rounds differently from a row of five now
    and then), so greedy tokens and their log-probs are plain decoding's. Without whole key blocks,
    steps whose tokens span a multiple of 16 keys round differently."""
    from lmforge.model.packed import pack_weights

    model = make_model(vocab_size=258, num_layers=2).to(torch.bfloat16)
    pack_weights(model)
    prompts = [[1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [5, 6, 7, 5, 6, 7, 5], [9, 10, 11, 12, 13] * 3]
    accepted = 0
    for prompt in prompts:
        plain = Engine(model, max_batch_size=1).generate([Request(prompt, greedy(60), logprobs=1)])[0]
        engine = Engine(model, max_batch_size=1)
        drafter = PromptLookup(ngram=2) if kind == "lookup" else DraftModel(model)
        fast = engine.generate([Request(prompt, greedy(60), logprobs=1, drafter=drafter, draft_tokens=4)])[0]
        accepted += engine.stats.accepted
        assert fast.token_ids == plain.token_ids
        assert [e.logprob for e in fast.logprobs] == [e.logprob for e in plain.logprobs]
    assert accepted > 0


@pytest.mark.slow
@pytest.mark.skipif(not packing_helps(torch.bfloat16, "cpu"), reason="needs native bf16 (AVX-512 BF16/AMX)")
def test_compiled_bf16_checks_give_the_compiled_steps_logits_to_the_bit(make_model):
    """The same through compiled steps: a checked guess's logits are the compiled one-token step's, to the bit,
    because every graph rounds to bf16 where the eager code does (compiled.INDUCTOR, emulate_precision_casts).
    Without that, a one-token graph fused a residual add into the RMSNorm after it and took the norm's
    statistic from the unrounded sum, a wider graph from the rounded one: the rows of a check parted from the
    steps they stand for (and greedy replies from plain ones on SmolLM2); with 4 layers this model shows it
    (with emulate_precision_casts off, the log-probs below part: checked by hand on torch 2.13)."""
    from lmforge.infer import CompiledDecodeStep, compiled
    from lmforge.model.packed import pack_weights

    model = make_model(vocab_size=258, num_layers=4).to(torch.bfloat16)
    pack_weights(model)
    prompts = [[1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [9, 10, 11, 12, 13] * 3]

    assert compiled.INDUCTOR["emulate_precision_casts"]
    step, accepted = CompiledDecodeStep(model, max_autotune=False), 0
    for prompt in prompts:
        plain = Engine(model, max_batch_size=1, decode_step=step).generate(
            [Request(prompt, greedy(40), logprobs=1)])[0]
        engine = Engine(model, max_batch_size=1, decode_step=step)
        fast = engine.generate([Request(prompt, greedy(40), logprobs=1, drafter=PromptLookup(ngram=2),
                                        draft_tokens=4)])[0]
        accepted += engine.stats.accepted
        assert fast.token_ids == plain.token_ids
        assert [e.logprob for e in fast.logprobs] == [e.logprob for e in plain.logprobs]
    assert accepted > 0
