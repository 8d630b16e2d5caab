"""The batched engine: a row of a mixed batch decodes exactly as its prompt alone."""

from __future__ import annotations

import pytest
import torch

from lmforge.infer import CompiledDecodeStep, SamplingConfig, generate
from lmforge.infer.engine import Engine, batch_buckets, common_prefix
from lmforge.infer.request import Request

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [9] * 14 + [1], [3, 3, 8, 2]]


def greedy(n: int = 20, **extra) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=n, temperature=0, **extra)


def sampled(seed: int, n: int = 24) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=n, temperature=1.0, top_k=20, top_p=0.95, seed=seed)


def run_alone(model, request_args: list[tuple[list[int], SamplingConfig]], **request_extra):
    return [Engine(model, max_batch_size=1).generate([Request(p, c, **request_extra)])[0] for p, c in request_args]


def test_mixed_batch_greedy_equals_each_prompt_alone_and_the_reference_decoder(make_model):
    model = make_model()
    batch = Engine(model, max_batch_size=8).generate([Request(p, greedy()) for p in PROMPTS])
    alone = run_alone(model, [(p, greedy()) for p in PROMPTS])
    reference = generate(model, PROMPTS, greedy(), use_cache=False)  # full recompute, no cache
    assert [c.token_ids for c in batch] == [c.token_ids for c in alone] == reference
    assert all(c.finish_reason == "length" and c.completion_tokens == 20 for c in batch)


def test_decode_steps_padded_to_the_full_batch_give_the_same_tokens(make_model):
    """decode_buckets=[max]: every step runs all slots (one compiled graph), rows decode as before."""
    model = make_model()
    sizes = []

    def step(ids, cache, **ragged):
        sizes.append(ids.shape[0])
        return model(ids, cache, **ragged)

    requests = [Request(p, greedy(6 + 3 * i)) for i, p in enumerate(PROMPTS)]  # rows end at different steps
    full = Engine(model, max_batch_size=8, decode_step=step, decode_buckets=[8]).generate(requests)
    default = Engine(model, max_batch_size=8).generate([Request(r.prompt_ids, r.sampling) for r in requests])
    assert [c.token_ids for c in full] == [c.token_ids for c in default]
    assert set(sizes) == {8}  # the last row alone still ran a full batch
    with pytest.raises(ValueError, match="decode_buckets"):
        Engine(model, max_batch_size=8, decode_buckets=[4])


def test_sampling_with_a_seed_does_not_depend_on_the_batch(make_model):
    model = make_model()
    args = [(p, sampled(seed)) for seed, p in enumerate(PROMPTS)]
    alone = [c.token_ids for c in run_alone(model, args)]
    together = [c.token_ids for c in Engine(model, max_batch_size=8).generate([Request(p, c) for p, c in args])]
    shuffled = Engine(model, max_batch_size=3).generate([Request(p, c) for p, c in reversed(args)])
    assert together == alone
    assert [c.token_ids for c in reversed(shuffled)] == alone
    other_seed = Engine(model).generate([Request(PROMPTS[0], sampled(99))])[0].token_ids
    assert other_seed != alone[0]


def test_each_row_keeps_its_own_settings_and_limits(make_model):
    model = make_model()
    first = Engine(model).generate([Request(PROMPTS[1], greedy(30))])[0].token_ids
    stop_token = first[5]
    requests = [Request(PROMPTS[1], greedy(30, stop_token_ids=[stop_token])), Request(PROMPTS[1], greedy(3)),
                Request(PROMPTS[1], sampled(1, 30)), Request(PROMPTS[1], greedy(30))]
    out = Engine(model, max_batch_size=4).generate(requests)
    assert out[0].token_ids == first[:first.index(stop_token)] and out[0].finish_reason == "stop"
    assert out[0].completion_tokens == first.index(stop_token) + 1  # the stop token counts as generated
    assert out[1].token_ids == first[:3] and out[1].finish_reason == "length"
    assert out[3].token_ids == first


def test_a_request_joining_mid_flight_changes_no_other_row(make_model):
    model = make_model()
    engine = Engine(model, max_batch_size=4)
    first = [Request(PROMPTS[0], greedy(30), request_id="a"), Request(PROMPTS[1], sampled(5, 30), request_id="b")]
    for r in first:
        engine.add(r)
    outputs: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    steps = 0
    while engine.has_work:
        if steps == 7:  # two rows are running: a third prompt joins the batch
            engine.add(Request(PROMPTS[3], sampled(6, 10), request_id="c"))
        for output in engine.step():
            outputs[output.request_id] += output.token_ids
        steps += 1
    alone = run_alone(model, [(PROMPTS[0], greedy(30)), (PROMPTS[1], sampled(5, 30)), (PROMPTS[3], sampled(6, 10))])
    assert [outputs[k] for k in "abc"] == [c.token_ids for c in alone]


def test_new_prompts_ride_along_with_the_running_rows_packed_without_padding(make_model):
    """Admitting requests costs the running rows no extra pass, and that pass computes the real tokens
    only: the running row's next token and the new prompts back to back (3 + 12 + 1 = 16, where
    right-padding both prompts to the longest, with the decode step apart, would run (2, 12) and (1, 1))."""
    model = make_model()
    shapes, forward = [], model.forward

    def recording(ids, *args, **kwargs):
        shapes.append(tuple(ids.shape))
        return forward(ids, *args, **kwargs)

    model.forward = recording
    engine = Engine(model, max_batch_size=4)
    requests = [Request(PROMPTS[0], greedy(8)), Request([5, 5, 5], greedy(6)), Request(list(range(20, 32)), greedy(6))]
    engine.add(requests[0])
    outputs = {r.request_id: [] for r in requests}
    for step in range(20):
        if step == 1:
            engine.add(requests[1])
            engine.add(requests[2])
        for output in engine.step():
            outputs[output.request_id] += output.token_ids
    assert shapes[:3] == [(1, 3), (1, 16), (4, 1)]  # then decode steps over slots 0..3
    assert engine.stats.prefill_passes == 2 and not engine.has_work
    del model.forward
    alone = run_alone(model, [(r.prompt_ids, r.sampling) for r in requests])
    assert [outputs[r.request_id] for r in requests] == [c.token_ids for c in alone]


def test_prefix_cache_hit_gives_the_cold_tokens_and_logprobs(make_model):
    model = make_model()
    system = [7, 1, 9, 2, 8, 3, 6, 4, 5, 10, 11, 12]
    turn = system + [20, 21, 22]
    cold = Engine(model, max_batch_size=2).generate([Request(turn, greedy(12), logprobs=3)])[0]
    engine = Engine(model, max_batch_size=2)
    warm_up = engine.generate([Request(system + [30, 31], greedy(5))])[0]
    hit = engine.generate([Request(turn, greedy(12), logprobs=3)])[0]
    assert warm_up.cached_tokens == 0 and hit.cached_tokens == len(system)
    assert engine.stats.prefix_hits == 1 and engine.stats.cached_tokens == len(system)
    assert hit.token_ids == cold.token_ids
    for a, b in zip(hit.logprobs, cold.logprobs):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]

def test_clearing_the_prefix_cache_forgets_free_slots_and_keeps_running_rows(make_model):
    model = make_model()
    system, other = [7, 1, 9, 2, 8, 3, 6, 4, 5, 10, 11, 12], [13, 2, 14, 3, 15, 4, 16, 5]
    engine = Engine(model, max_batch_size=3)
    first = engine.generate([Request(system + [30, 31], greedy(5))])[0]
    engine.add(Request(other + [40], greedy(30), request_id="running"))
    engine.step()
    held = len(system) + 2 + len(first.token_ids) - 1  # the free slot's prompt and the tokens fed back after it
    assert engine.clear_prefix_cache() == held
    cold = Engine(model, max_batch_size=1).generate([Request(system + [20, 21], greedy(6))])[0]
    again = engine.generate([Request(system + [20, 21], greedy(6))])[0]
    assert again.cached_tokens == 0 and again.token_ids == cold.token_ids
    shared = engine.generate([Request(other + [50], greedy(2))])[0]
    assert shared.cached_tokens == len(other)  # the running row's slot still serves its prefix
    while engine.has_work:
        engine.step()
    assert engine.clear_prefix_cache() > 0 and engine.clear_prefix_cache() == 0


def test_prefix_shared_with_a_running_row_is_copied_into_a_free_slot(make_model):
    model = make_model()
    shared = [7, 1, 9, 2, 8, 3, 6, 4]
    engine = Engine(model, max_batch_size=2)
    engine.add(Request(shared + [1], greedy(40), request_id="long"))
    engine.step()
    engine.step()
    copy = engine.generate([Request(shared + [2, 3], sampled(3))])[0]
    cold = Engine(model, max_batch_size=1).generate([Request(shared + [2, 3], sampled(3))])[0]
    assert copy.cached_tokens == len(shared) and copy.token_ids == cold.token_ids


def test_logprobs_are_the_models_distribution(make_model):
    model = make_model()
    prompt = PROMPTS[1]
    out = Engine(model).generate([Request(prompt, greedy(4), logprobs=2, prompt_logprobs=1)])[0]
    ids = prompt + out.token_ids
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)  # (T, V)
    for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert entry.token_id == ids[i]
        assert entry.logprob == pytest.approx(float(reference[i - 1, ids[i]]), abs=1e-5)
    for i, entry in enumerate(out.logprobs):
        position = len(prompt) - 1 + i
        assert entry.logprob == pytest.approx(float(reference[position, entry.token_id]), abs=1e-5)
        assert entry.top[0][0] == entry.token_id  # greedy picks the likeliest
        assert len(entry.top) == 2
    assert out.prompt_logprobs[0] is None and out.cached_tokens == 0


def test_scoring_continuations_reuses_the_context_and_matches_a_full_forward(make_model):
    """Multiple choice: max_new_tokens=0 scores only; the context is computed once and each
    choice's log-probs equal those of one full forward pass over context + choice."""
    model = make_model()
    context, choices = [7, 1, 9, 2, 8, 3, 6, 4, 5], [[10, 11], [12], [13, 14, 15]]
    engine = Engine(model, max_batch_size=2)
    requests = [Request(context + c, SamplingConfig(max_new_tokens=0), prompt_logprobs=1,
                        prompt_logprobs_start=len(context)) for c in choices]
    outs = engine.generate(requests)
    assert [o.cached_tokens for o in outs] == [0, len(context) - 1, len(context) - 1]
    for choice, out in zip(choices, outs):
        ids = context + choice
        assert out.token_ids == [] and out.completion_tokens == 0 and out.finish_reason == "length"
        assert out.prompt_logprobs[: len(context)] == [None] * len(context)
        with torch.no_grad():
            reference = torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)  # (T, V)
        for i in range(len(context), len(ids)):
            entry = out.prompt_logprobs[i]
            assert entry.token_id == ids[i]
            assert entry.logprob == pytest.approx(float(reference[i - 1, ids[i]]), abs=1e-5)
            assert entry.top[0][0] == int(reference[i - 1].argmax())
    with pytest.raises(ValueError, match="prompt_logprobs_start"):
        engine.add(Request(context, SamplingConfig(max_new_tokens=0), prompt_logprobs=0,
                           prompt_logprobs_start=len(context) + 1))


def test_continuations_scored_as_branches_equal_each_pair_alone(make_model):
    """A question and its choices in one row (a tree of branches): each choice's log-probs equal a
    forward pass over context + that choice alone, and the row shares a pass with a plain prompt."""
    model = make_model()
    context, choices = [7, 1, 9, 2, 8, 3, 6, 4, 5], [[10, 11], [12], [13, 14, 15], [10, 12]]
    engine = Engine(model, max_batch_size=4)
    tree = Request(context, SamplingConfig(max_new_tokens=0), continuations=choices)
    plain = Request([4, 4, 2, 9, 9, 1, 5, 7, 3, 3, 2, 1, 6, 6, 8, 2], greedy(2), prompt_logprobs=0)
    out, other = engine.generate([tree, plain])
    assert engine.stats.prefill_passes == 1 and out.token_ids == [] and out.finish_reason == "length"
    for choice, entries in zip(choices, out.continuation_logprobs):
        ids = context + choice
        reference = forward_logprobs(model, ids)
        assert [e.token_id for e in entries] == choice
        for i, entry in zip(range(len(context), len(ids)), entries):
            assert entry.logprob == pytest.approx(float(reference[i - 1, ids[i]]), abs=1e-5)
            assert entry.top[0][0] == int(reference[i - 1].argmax())
    reference = forward_logprobs(model, plain.prompt_ids)
    for i in range(1, len(plain.prompt_ids)):
        assert other.prompt_logprobs[i].logprob == pytest.approx(float(reference[i - 1, plain.prompt_ids[i]]), abs=1e-5)
    again = engine.generate([Request(context + [20], greedy(2))])[0]  # the context stayed in the prefix cache
    assert again.cached_tokens == len(context)
    for bad in ([], [[]], [[10**6]]):
        with pytest.raises(ValueError, match="continuation"):
            engine.add(Request(context, SamplingConfig(max_new_tokens=0), continuations=bad))


def test_prompts_prefilled_together_equal_each_alone(make_model):
    """Several prompts of different lengths in one packed pass: every row's prompt
    log-probs equal a full forward of that prompt alone, and the greedy tokens are the same."""
    model = make_model()
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5], [8, 9, 7, 9, 3, 2, 3], [8, 4, 6, 2, 6, 4, 3, 3],
               [(7 * i) % 60 + 1 for i in range(100)]]  # the long one attends in a batch of its own
    engine = Engine(model, max_batch_size=8)
    outs = engine.generate([Request(p, greedy(3), prompt_logprobs=0) for p in prompts])
    assert engine.stats.prefill_passes == 1
    assert [prompts.rows.shape for prompts in engine.cache.prompts] == [(1, 100), (4, 8)]
    for prompt, out in zip(prompts, outs):
        reference = forward_logprobs(model, prompt)
        for i in range(1, len(prompt)):
            assert out.prompt_logprobs[i].logprob == pytest.approx(float(reference[i - 1, prompt[i]]), abs=1e-5)
        assert out.token_ids == run_alone(model, [(prompt, greedy(3))])[0].token_ids


def test_prompts_attend_in_batches_that_keep_padding_small():
    """A packed pass's prompts attend in padded batches: alike ones together, a long one apart from short
    ones (padded to it they would do up to twice their own attention work)."""
    from lmforge.infer.slot_cache import Segment, _batches

    def segment(tokens: int, keys: int) -> Segment:
        return Segment(0, 0, tokens, torch.ones(tokens, keys, dtype=torch.bool))

    long, short = segment(200, 200), [segment(3, 3), segment(4, 10), segment(5, 5)]
    batches = _batches([short[0], long, *short[1:]])
    assert [[id(s) for s in batch] for batch in batches] == [[id(long)], [id(short[1]), id(short[2]), id(short[0])]]
    alike = [segment(40, 40 + i) for i in range(5)]
    assert len(_batches(alike)) == 1


def forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)  # (T, V)


def test_stop_strings_cut_the_text_per_row(make_model, byte_tokenizer):
    model = make_model(vocab_size=258)
    prompt = [256, 65, 66]
    free = Engine(model).generate([Request(prompt, greedy(20), decode=byte_tokenizer.decode)])[0]
    stop = free.text[6:8]
    assert stop
    out = Engine(model, max_batch_size=2).generate([
        Request(prompt, greedy(20, stop=[stop]), decode=byte_tokenizer.decode),
        Request(prompt, greedy(20), decode=byte_tokenizer.decode)])
    assert out[0].text == free.text[:free.text.index(stop)] and out[0].finish_reason == "stop"
    assert out[1].text == free.text


def test_abort_frees_the_slot_and_reports_it(make_model):
    engine = Engine(make_model(), max_batch_size=1)
    engine.add(Request(PROMPTS[0], greedy(50), request_id="x"))
    engine.add(Request(PROMPTS[1], greedy(5), request_id="y"))
    engine.step()
    assert engine.usage()["running"] == 1 and engine.usage()["waiting"] == 1
    assert engine.abort("x") and not engine.abort("nobody")
    outputs = engine.step()
    assert outputs[0].request_id == "x" and outputs[0].finish_reason == "abort"
    assert any(o.request_id == "y" for o in outputs)  # y took the freed slot in the same step


def test_bad_requests_are_refused_with_a_reason(make_model):
    engine = Engine(make_model(), max_batch_size=1, context=32)
    with pytest.raises(ValueError, match="empty"):
        engine.add(Request([], greedy()))
    with pytest.raises(ValueError, match="context of 32"):
        engine.add(Request([1] * 20, greedy(20)))
    with pytest.raises(ValueError, match="token ids"):
        engine.add(Request([1, 999], greedy()))
    with pytest.raises(ValueError, match="beam"):
        engine.add(Request([1], SamplingConfig(max_new_tokens=4, num_beams=2, temperature=0)))


def test_penalties_change_the_choice(make_model):
    model = make_model()
    plain = Engine(model).generate([Request(PROMPTS[2], greedy(30))])[0].token_ids
    penalised = Engine(model).generate([Request(PROMPTS[2], greedy(30, frequency_penalty=2.0,
                                                                    presence_penalty=2.0))])[0].token_ids
    assert len(set(plain)) < len(plain)  # the plain greedy output repeats itself
    assert penalised != plain
    assert max(penalised.count(t) for t in penalised) <= max(plain.count(t) for t in plain)


def test_helpers():
    assert batch_buckets(1) == [1] and batch_buckets(8) == [1, 2, 4, 8] and batch_buckets(6) == [1, 2, 4, 6]
    assert common_prefix([1, 2, 3, 4], [1, 2, 5]) == 2 and common_prefix([], [1]) == 0
    assert common_prefix(list(range(1000)), list(range(700)) + [0]) == 700


def test_compiled_step_serves_changing_batches_without_recompiling(make_model, config_patches):
    from torch._dynamo.utils import counters

    model = make_model()
    reference = Engine(model, max_batch_size=2).generate([Request(p, greedy(12)) for p in PROMPTS[:3]])
    engine = Engine(model, max_batch_size=2, decode_step=CompiledDecodeStep(model, max_autotune=False, prefill=True))
    before_warm_up = counters["stats"]["unique_graphs"]
    engine.warm_up()
    compiled_before = counters["stats"]["unique_graphs"]
    # one graph per batch bucket (the keys read are symbolic from the first compile, not a constant first),
    # and one for every packed pass that admits prompts (every size in it symbolic)
    assert compiled_before - before_warm_up == len(engine.decode_buckets) + 1
    # and the graphs run without their compile settings patched in (CompiledDecodeStep._run): with no
    # recompiling, no call needs them
    with config_patches() as patches:
        out = engine.generate([Request(p, greedy(12)) for p in PROMPTS[:3]])  # batch 2, then 1 as rows end
        out += engine.generate([Request(PROMPTS[3], greedy(30))])
        # packed passes of other shapes: a question with its choices as branches beside a prompt of 20
        # tokens, then one that reuses most of that prompt from the prefix cache
        long = PROMPTS[1] * 3
        scoring = [Request(PROMPTS[4], SamplingConfig(max_new_tokens=0), continuations=[[10, 11], [12], [13, 14, 15]]),
                   Request(long[:20], greedy(3), prompt_logprobs=0),
                   Request(long, greedy(3), prompt_logprobs=0, prompt_logprobs_start=18)]
        scored = [engine.generate(scoring[:2]), engine.generate(scoring[2:])]
    assert counters["stats"]["unique_graphs"] == compiled_before
    assert patches.call_count == 0
    assert [c.token_ids for c in out[:3]] == [c.token_ids for c in reference]
    eager = Engine(model, max_batch_size=2)
    for got, want in zip(scored, [eager.generate(scoring[:2]), eager.generate(scoring[2:])]):
        for a, b in zip(got, want):
            assert a.token_ids == b.token_ids and a.cached_tokens == b.cached_tokens
            pairs = [(x, y) for p, q in zip(a.continuation_logprobs or [], b.continuation_logprobs or [])
                     for x, y in zip(p, q)] + list(zip(a.prompt_logprobs or [], b.prompt_logprobs or []))
            assert pairs and all((x is None and y is None) or x.logprob == pytest.approx(y.logprob, abs=5e-5)
                                 for x, y in pairs)
    assert scored[1][0].cached_tokens == 17


def test_a_stop_token_has_a_logprob_entry_but_no_token(make_model):
    """Scoring asks for one generated token's log-probability after the prompt, whatever it is."""
    model = make_model()
    first = Engine(model).generate([Request(PROMPTS[1], greedy(1), logprobs=1)])[0]
    stopped = Engine(model).generate([Request(PROMPTS[1], greedy(5, stop_token_ids=first.token_ids), logprobs=1)])[0]
    assert stopped.token_ids == [] and stopped.finish_reason == "stop" and stopped.completion_tokens == 1
    assert [e.token_id for e in stopped.logprobs] == first.token_ids
    assert stopped.logprobs[0].logprob == pytest.approx(first.logprobs[0].logprob)


def test_ids_past_the_tokenizer_are_never_sampled(make_model):
    model = make_model()  # 64 logits; pretend the tokenizer knows only 10 tokens
    out = Engine(model, vocab_limit=10).generate([Request(p, sampled(i, 40)) for i, p in enumerate(PROMPTS[:3])])
    assert all(0 <= t < 10 for c in out for t in c.token_ids)


def small_seq2seq(position: str = "relative"):
    from lmforge.model import ModelConfig, build_model

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=300, max_seq_len=64, dim=64, num_layers=2, decoder_layers=2, num_heads=2,
                         num_kv_heads=2, position=position)
    return build_model(config).eval()


@pytest.fixture(scope="module", params=["relative", "rope"])
def seq2seq(request):
    """A small encoder-decoder, with T5's relative position bias or with rotary positions."""
    return small_seq2seq(request.param)


SOURCES = [[5, 9, 13], list(range(20, 37)), [7] * 9, list(range(100, 130)), [41, 42], [250, 3, 3, 9, 12]]


def test_an_encoder_decoder_decodes_in_the_engine_as_alone(seq2seq):
    """More sources than slots: requests join mid-flight (packed passes beside decode steps), each row
    reads its own source's memory, and the targets equal encoding and decoding each source alone."""
    from lmforge.infer.seq2seq import generate_seq2seq

    reference = generate_seq2seq(seq2seq, SOURCES, greedy(12), use_cache=False)
    for slots in (1, 4):
        batch = Engine(seq2seq, max_batch_size=slots).generate([Request(s, greedy(12)) for s in SOURCES])
        assert [c.token_ids for c in batch] == reference
        assert not [n for n, m in seq2seq.named_modules() if m.training]  # the engine leaves the model in its mode
    # sampled with a seed: a row's tokens do not depend on what else shares the batch
    alone = [Engine(seq2seq, max_batch_size=1).generate([Request(s, sampled(i, 10))])[0] for i, s in enumerate(SOURCES)]
    mixed = Engine(seq2seq, max_batch_size=3).generate([Request(s, sampled(i, 10)) for i, s in enumerate(SOURCES)])
    assert [c.token_ids for c in mixed] == [c.token_ids for c in alone]


def test_an_encoder_decoder_scores_targets_as_continuations(seq2seq):
    """Continuations of a source are scored targets: their log-probs equal one teacher-forced pass."""
    targets = [[10, 11], [12], [13, 14, 15]]
    out = Engine(seq2seq, max_batch_size=2).generate([Request(SOURCES[1], SamplingConfig(max_new_tokens=0),
                                                              continuations=targets)])[0]
    for target, entries in zip(targets, out.continuation_logprobs):
        with torch.no_grad():
            logits = seq2seq(torch.tensor([SOURCES[1]]), torch.tensor([[0, *target[:-1]]]))[0]
        reference = torch.log_softmax(logits.float(), dim=-1)
        assert [e.token_id for e in entries] == target
        assert [e.logprob for e in entries] == pytest.approx([float(reference[i, t]) for i, t in enumerate(target)],
                                                             abs=1e-5)


def test_an_encoder_decoder_refuses_what_its_source_cannot_give(seq2seq):
    engine = Engine(seq2seq, max_batch_size=2)
    for request, reason in ((Request([], greedy()), "source is empty"), (Request([1] * 65, greedy()), "reads at most"),
                            (Request([1, 2], greedy(), prompt_logprobs=1), "no log-probs"),
                            (Request([1, 400], greedy()), "source token ids")):
        with pytest.raises(ValueError, match=reason):
            engine.add(request)
    with pytest.raises(ValueError, match="eagerly"):  # (the step compiles lazily: nothing compiles here)
        Engine(seq2seq, decode_step=CompiledDecodeStep(seq2seq, max_autotune=False, prefill=True))
    with pytest.raises(ValueError, match="Engine.warm_up"):  # its step compiles around the engine's decoder
        CompiledDecodeStep(seq2seq, max_autotune=False).warm_up()


def test_a_compiled_encoder_decoder_decodes_sources_of_every_length_as_the_eager_engine():
    """The engine compiles its decoder's decode step (T5's relative biases gathered inside the graph):
    one graph for its batch serves sources of 2 to 30 tokens and requests joining mid-flight, greedy and
    sampled tokens equal the eager engine's, and a second engine over the same model reads its own
    sources' memory (not the first engine's, baked into a graph)."""
    from torch._dynamo.utils import counters

    model = small_seq2seq("relative")
    step = CompiledDecodeStep(model, max_autotune=False)
    eager = Engine(model, max_batch_size=3)
    engine = Engine(model, max_batch_size=3, decode_buckets=[3], decode_step=step)
    before = counters["stats"]["unique_graphs"]
    engine.warm_up()
    warm = counters["stats"]["unique_graphs"]
    assert warm - before == 1
    requests = [lambda: [Request(s, greedy(10)) for s in SOURCES],
                lambda: [Request(s, sampled(i, 10)) for i, s in enumerate(SOURCES)]]
    for make in requests:
        assert [c.token_ids for c in engine.generate(make())] == [c.token_ids for c in eager.generate(make())]
    assert counters["stats"]["unique_graphs"] == warm  # nothing compiled after the warm-up
    other = Engine(model, max_batch_size=3, decode_buckets=[3], decode_step=step)
    reversed_sources = [Request(s[::-1], greedy(10)) for s in SOURCES[:3]]
    assert [c.token_ids for c in other.generate(reversed_sources)] == \
           [c.token_ids for c in eager.generate([Request(s[::-1], greedy(10)) for s in SOURCES[:3]])]
