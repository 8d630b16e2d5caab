"""Parity: per-choice log-likelihoods of SmolLM2-135M from `lmforge eval` equal transformers' on the same items."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import InputError


@pytest.mark.slow
def test_choice_loglikelihoods_equal_transformers_within_1e_3():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from lmforge.api import load
    from lmforge.eval.harness import LocalModel
    from lmforge.eval.tasks_builtin import builtin_task
    from lmforge.interop.packaged import packaged_model_path

    try:
        path = packaged_model_path("smollm2-135m-instruct")
    except InputError as err:
        pytest.skip(str(err))
    local = LocalModel(load(path, device="cpu", dtype="fp32"), progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    task = builtin_task("pyref_mc", limit=3, seed=0)
    pairs = [(task.context(item, 1), task.target_delimiter + choice) for item in task.test for choice in item.choices]
    ours = local.loglikelihood(pairs)
    for (context, continuation), score in zip(pairs, ours):
        context_ids, continuation_ids = local.pair_ids(context, continuation)
        ids = context_ids + continuation_ids
        with torch.inference_mode():
            logprobs = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
        theirs = sum(float(logprobs[i - 1, ids[i]]) for i in range(len(context_ids), len(ids)))
        assert score.logprob == pytest.approx(theirs, abs=1e-3)
    assert local.engine.stats.prefill_passes < len(pairs)  # an item's choices were scored in one row
