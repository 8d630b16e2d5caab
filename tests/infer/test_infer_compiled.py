"""The compiled decode step gives the same tokens as the eager model (slow: it compiles)."""

from __future__ import annotations

import pytest

from lmforge.infer import CompiledDecodeStep, SamplingConfig, beam_search, generate, generate_tokens

PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7, 6, 5]]


@pytest.mark.slow
def test_compiled_step_decodes_like_the_eager_model(make_model):
    model = make_model()
    step = CompiledDecodeStep(model, max_autotune=False)
    step.warm_up(batch_size=2)
    config = SamplingConfig(max_new_tokens=12, temperature=0)
    eager = generate(model, PROMPTS, config)
    assert generate(model, PROMPTS, config, decode_step=step) == eager
    sampled = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=4)
    assert generate(model, PROMPTS, sampled, decode_step=step) == generate(model, PROMPTS, sampled)
    assert list(generate_tokens(model, [7, 7, 7], config, decode_step=step)) == generate(model, [[7, 7, 7]], config)[0]
    beams = SamplingConfig(max_new_tokens=6, temperature=0, num_beams=2)
    compiled, eager_beam = beam_search(model, PROMPTS[0], beams, decode_step=step), beam_search(model, PROMPTS[0], beams)
    assert compiled.tokens == eager_beam.tokens
    assert compiled.score == pytest.approx(eager_beam.score, abs=1e-4)


def test_compiled_step_needs_the_cache(make_model):
    model = make_model()
    step = CompiledDecodeStep(model, max_autotune=False)  # compiles lazily: nothing runs here
    with pytest.raises(ValueError, match="KV cache"):
        step(model.embed.weight.new_zeros(1, 2).long(), None)
    with pytest.raises(ValueError, match="KV cache"):
        generate(model, PROMPTS, SamplingConfig(max_new_tokens=2), use_cache=False, decode_step=step)


@pytest.mark.slow
def test_two_models_of_one_shape_each_run_their_own_compiled_graph(make_model):
    """Every DecoderLM shares one code object; the guards kept must still tell the models apart."""
    models = [make_model(seed=0), make_model(seed=1)]
    steps = [CompiledDecodeStep(model, max_autotune=False) for model in models]
    for step in steps:
        step.warm_up(batch_size=1)
    config = SamplingConfig(max_new_tokens=8, temperature=0)
    outputs = [generate(model, [[1, 2, 3]], config) for model in models]
    assert outputs[0] != outputs[1]  # the two models differ, so a shared graph would show
    for model, step, eager in zip(models, steps, outputs):
        assert generate(model, [[1, 2, 3]], config, decode_step=step) == eager


@pytest.mark.slow
def test_a_step_with_the_cpp_wrapper_runs_cpp_and_decodes_like_the_eager_model(make_model):
    from torch._inductor.utils import run_and_get_code

    model = make_model()
    step = CompiledDecodeStep(model, max_autotune=False, cpp_wrapper=True)
    _, sources = run_and_get_code(step.warm_up, 1)
    # the wrapper Inductor wrote is C++ (its entry function), not a Python `def call(...)`
    assert len(sources) == 1 and "inductor_entry_impl" in sources[0] and "def call(" not in sources[0]
    config = SamplingConfig(max_new_tokens=12, temperature=0)
    assert generate(model, PROMPTS, config, decode_step=step) == generate(model, PROMPTS, config)


@pytest.mark.slow
def test_a_warm_step_patches_no_settings_and_a_new_batch_size_still_compiles_under_them(make_model, config_patches):
    """Patching the compile settings cost ~0.2 ms a call: a step that has compiled runs its graphs without
    them, and a call that must compile (here batch 2 after batch 1) still compiles under them (frozen)."""
    from torch._inductor.utils import run_and_get_code

    model = make_model()
    step = CompiledDecodeStep(model, max_autotune=False)
    step.warm_up(batch_size=1)
    config = SamplingConfig(max_new_tokens=8, temperature=0)
    with config_patches() as patches:
        assert generate(model, PROMPTS[:1], config, decode_step=step) == generate(model, PROMPTS[:1], config)
        assert patches.call_count == 0
        got, sources = run_and_get_code(generate, model, PROMPTS, config, decode_step=step)
        assert any(call.kwargs.get("freezing") for call in patches.call_args_list)
    assert len(sources) == 1 and "_frozen_param" in sources[0]  # the batch-2 graph: weights folded in as constants
    assert got == generate(model, PROMPTS, config)


@pytest.mark.slow
def test_a_stance_of_the_callers_own_stays_in_force(make_model):
    """A warm step runs its graphs under its own stance only where the caller left Dynamo's default:
    under ``force_eager`` no compiled region runs."""
    import torch
    from torch.profiler import profile

    model = make_model()
    step = CompiledDecodeStep(model, max_autotune=False)
    step.warm_up(batch_size=1)
    config = SamplingConfig(max_new_tokens=4, temperature=0)

    def compiled_regions(**stance) -> int:
        with torch.compiler.set_stance(**stance), profile() as run:
            assert generate(model, PROMPTS[:1], config, decode_step=step) == generate(model, PROMPTS[:1], config)
        return sum(event.name.startswith("Torch-Compiled Region") for event in run.events())

    assert compiled_regions(stance="default") == 3  # the 3 steps after the prompt
    assert compiled_regions(stance="force_eager") == 0
