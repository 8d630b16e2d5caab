"""`lmforge eval` against a server: the endpoint backend and lm-evaluation-harness's `local-completions`
score the same items as the local engine does."""

from __future__ import annotations

import json

import pytest

from lmforge.eval.harness import EndpointModel, LocalModel

MODEL = "tiny"  # the live server's model name (conftest.py)

CONTEXTS = ["Question: Which animal is quick and brown?\nAnswer:", "Question: What is the capital of France?\nAnswer:",
            "The lazy"]
CHOICES = [" fox", " dog", " Paris is nice", " null"]


def test_endpoint_scores_and_generates_as_the_local_engine(live_server, tiny_lm):
    local = LocalModel(tiny_lm, progress=False)
    remote = EndpointModel(live_server, progress=False, concurrency=3)
    assert remote.name == MODEL
    pairs = [(c, k) for c in CONTEXTS for k in CHOICES]
    for ours, theirs in zip(local.loglikelihood(pairs), remote.loglikelihood(pairs)):
        assert theirs.logprob == pytest.approx(ours.logprob, abs=1e-4)
        assert theirs.tokens == ours.tokens
    assert remote.generate(CONTEXTS, stop=["\n"], max_new_tokens=6) == local.generate(CONTEXTS, stop=["\n"],
                                                                                      max_new_tokens=6)
    text = "Paris is the capital of France. The quick brown fox."
    ours, theirs = local.loglikelihood_rolling([text])[0], remote.loglikelihood_rolling([text])[0]
    assert theirs.logprob == pytest.approx(ours.logprob, abs=1e-4) and theirs.tokens == ours.tokens


@pytest.mark.slow
def test_lm_evaluation_harness_gets_the_same_choice_loglikelihoods(live_server, tiny_lm, tmp_path):
    """lm-eval's local-completions model against `lmforge serve`, on a multiple-choice task written as
    lm-eval YAML: every per-choice log-likelihood equals lmforge's own within 1e-4."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    items = [{"prompt": c, "choices": [k.strip() for k in CHOICES], "gold": i % len(CHOICES)}
             for i, c in enumerate(CONTEXTS)]
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    (tmp_path / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: " "
metric_list:
  - metric: acc
""")
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"base_url": live_server + "/v1/completions", "model": MODEL, "tokenizer_backend": "remote",
                    "num_concurrent": 2, "max_retries": 1},
        tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    theirs = {s["doc"]["prompt"]: [r[0][0] for r in s["resps"]] for s in results["samples"]["tiny_mc"]}
    local = LocalModel(tiny_lm, progress=False, add_bos=False)  # lm-eval's remote tokenizer adds no BOS
    for item in items:
        ours = [s.logprob for s in local.loglikelihood([(item["prompt"], " " + k) for k in item["choices"]])]
        assert theirs[item["prompt"]] == pytest.approx(ours, abs=1e-4)
