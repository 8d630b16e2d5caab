"""`lmforge eval`: the three request types on the engine equal a plain forward pass; the runner,
its outputs, the leaderboard and the command line."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch

from lmforge.cli import main
from lmforge.eval import leaderboard
from lmforge.eval import metrics as M
from lmforge.eval.harness import LocalModel, _sum_logprobs, split_pair
from lmforge.eval.run import (
    EvalConfig,
    Prompting,
    aggregate,
    evaluate,
    extract_answer,
    extract_choice,
    write_outputs,
)
from lmforge.eval.task import Item, Task


def forward_logprobs(lm, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(lm.model(torch.tensor([ids]))[0].float(), dim=-1)  # (T, V)


def test_loglikelihood_equals_a_forward_pass_and_reuses_the_shared_context(tiny_lm):
    model = LocalModel(tiny_lm, batch_size=2, progress=False)
    context = "The quick brown fox jumps over the"
    pairs = [(context, " lazy dog"), (context, " capital"), (context + " ", "Paris")]
    before = model.engine.stats.prefill_passes
    scores = model.loglikelihood(pairs)
    assert model.engine.stats.prefill_passes == before + 1  # one row: the context once, the choices as branches
    for (ctx, cont), score in zip(pairs, scores):
        ctx, cont = split_pair(ctx, cont)
        ctx_ids = tiny_lm.encode_prompt(ctx)
        ids = tiny_lm.encode_prompt(ctx + cont)
        reference = forward_logprobs(tiny_lm, ids)
        positions = range(len(ctx_ids), len(ids))
        assert score.tokens == len(ids) - len(ctx_ids) > 0
        assert score.logprob == pytest.approx(sum(float(reference[i - 1, ids[i]]) for i in positions), abs=1e-4)
        assert score.greedy == all(int(reference[i - 1].argmax()) == ids[i] for i in positions)
    ids = tiny_lm.encode_prompt(context)  # a continuation that is the greedy one, token by token
    for _ in range(3):
        ids.append(int(forward_logprobs(tiny_lm, ids)[-1].argmax()))
    request = model._score_request(ids[:-3], ids[-3:])
    assert _sum_logprobs(model._run([request], "greedy")[0].prompt_logprobs[request.prompt_logprobs_start:]).greedy


def test_rolling_loglikelihood_scores_every_token_once_across_windows(tiny_lm):
    model = LocalModel(tiny_lm, progress=False)
    model.window = 16  # windows of 15 new tokens: the text below needs several
    text = "Paris is the capital of France. The quick brown fox jumps over the lazy dog. " * 3
    ids = tiny_lm.tokenizer.encode(text)
    assert len(ids) > 2 * 15
    expected, previous = 0.0, tiny_lm.tokenizer.bos_id
    for start in range(0, len(ids), 15):
        window = [previous, *ids[start:start + 15]]
        reference = forward_logprobs(tiny_lm, window)
        expected += sum(float(reference[i - 1, window[i]]) for i in range(1, len(window)))
        previous = ids[start + 14] if start + 14 < len(ids) else None
    score = model.loglikelihood_rolling([text])[0]
    assert score.tokens == len(ids)
    assert score.logprob == pytest.approx(expected, abs=1e-3)


def test_generate_is_greedy_and_stops(tiny_lm):
    model = LocalModel(tiny_lm, progress=False)
    prompts = ["The quick brown", "Paris is"]
    replies = model.generate(prompts, stop=["."], max_new_tokens=12)
    for prompt, reply in zip(prompts, replies):
        assert reply == tiny_lm.generate(prompt, max_new_tokens=12, temperature=0, stop=["."])
        assert "." not in reply


def small_task(kind: str = "multiple_choice") -> Task:
    items = [Item(f"q{i}", f"Which word comes after {w}?", ("dog", "fox", "cat"), i % 3, group="ab"[i % 2])
             for i, w in enumerate(["lazy", "brown", "the", "quick", "over", "jumps"])]
    if kind == "generate":
        items = [Item(i.id, i.question, answer=i.gold_text, aliases=("fox",)) for i in items]
    return Task("small", kind, test=items[:4], train=items[4:], max_new_tokens=4)


@pytest.mark.parametrize("strategy", ["zero", "few:2", "verbalizer", "cot"])
def test_multiple_choice_records_and_metrics(tiny_lm, strategy):
    model = LocalModel(tiny_lm, progress=False)
    task = small_task()
    from lmforge.eval.run import _score

    records = _score(model, task, task.test, Prompting.parse(strategy), seed=0)
    assert [r["id"] for r in records] == ["q0", "q1", "q2", "q3"]
    for record, item in zip(records, task.test):
        assert record["gold"] == item.answer
        if strategy != "cot":
            lls = record["loglikelihoods"]
            assert record["pred"] == max(range(3), key=lls.__getitem__)
            assert record["acc"] == float(record["pred"] == item.answer)
            assert sum(record["probabilities"]) == pytest.approx(1, abs=1e-5)
            assert record["confidence"] == pytest.approx(max(record["probabilities"]), abs=1e-5)
        if strategy == "few:2":
            assert record["prompt"].count("Which word comes after") == 3  # two solved examples, then the item
    metrics = aggregate("multiple_choice", records, iterations=50)
    assert metrics["acc"]["value"] == pytest.approx(sum(r["acc"] for r in records) / 4)
    assert "acc_by_group" in metrics and set(metrics["acc_by_group"]["value"]) == {"a", "b"}


def test_a_task_s_metrics_add_corpus_bleu_chrf_and_aurc():
    """Metrics a task names are reported beside its kind's defaults, with the values of the functions."""
    generated = [{"flexible": reply, "gold": [gold], "exact_match_strict": 0.0, "exact_match_flexible": 0.0,
                  "f1": 0.0} for reply, gold in [("the cat sat on the mat", "the cat sat on a mat"),
                                                 ("a dog barked", "the dog barked loudly")]]
    plain = aggregate("generate", generated, iterations=20)
    assert "bleu" not in plain and "chrf" not in plain
    metrics = aggregate("generate", generated, iterations=20, extra=("bleu", "chrf"))
    replies, golds = [r["flexible"] for r in generated], [r["gold"][0] for r in generated]
    assert metrics["bleu"]["value"] == pytest.approx(M.bleu(replies, golds)) and metrics["bleu"]["value"] > 0
    assert metrics["chrf"]["value"] == pytest.approx(M.chrf(replies, golds))
    chinese = [{**generated[0], "flexible": "猫坐在垫子上", "gold": ["猫坐在一个垫子上"]}]
    assert aggregate("generate", chinese, iterations=20, extra=("bleu",))["bleu"]["value"] == pytest.approx(
        M.bleu(["猫坐在垫子上"], ["猫坐在一个垫子上"], tokenize="zh"))  # not 0, as 13a tokens would give
    chosen = [{"acc": float(a), "confidence": c, "probabilities": [c, 1 - c], "gold": 0}
              for a, c in [(1, 0.9), (0, 0.8), (1, 0.6), (0, 0.55)]]
    mc = aggregate("multiple_choice", chosen, iterations=20, extra=("aurc",))
    assert mc["aurc"]["value"] == pytest.approx(M.aurc([0.9, 0.8, 0.6, 0.55], [1, 0, 1, 0]))
    assert mc["aurc"]["value"] == pytest.approx(1 - mc["selective_auc"]["value"])


def test_answer_extraction():
    assert extract_answer("Let me see. The answer is Paris.\nMore", None, cot=True) == "Paris"
    assert extract_answer("x = 41 + 1 = 42, so 42", r"(\d+)") == "42"
    assert extract_answer("  Paris.\nand more", None) == "Paris"
    assert extract_choice("so the answer is (B).", ("cat", "dog")) == 1
    assert extract_choice("I pick dog, not cat", ("cat", "dog")) == 0  # the last choice named
    assert extract_choice("nothing relevant", ("cat", "dog")) is None


def test_evaluate_writes_results_samples_report_and_leaderboard(tiny_lm, tmp_path, monkeypatch):
    import lmforge.eval.run as run

    monkeypatch.setattr(run, "load_tasks", lambda spec, limit, seed: [small_task(), small_task("generate")])
    config = EvalConfig(prompting="zero,few:2", out=str(tmp_path / "out"), bootstrap=50, perturb="typos")
    results = evaluate(LocalModel(tiny_lm, progress=False), config, "tiny")
    assert set(results["tasks"]["small"]) == {"zero", "few:2"}
    entry = results["tasks"]["small"]["zero"]
    assert entry["n"] == 4 and entry["chat_template"] is False and "robustness" in entry
    assert set(entry["robustness"]["typos"]) == {"exact_match_flexible", "performance_drop_rate",
                                                 "attack_success_rate"}
    write_outputs(results, config.out)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["config_hash"] == results["config_hash"] and "samples" not in saved
    assert len((tmp_path / "out" / "samples" / "small.few-2.jsonl").read_text().splitlines()) == 4
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## small" in report and "±" in report
    db = tmp_path / "lb.sqlite"
    assert leaderboard.record(db, results) > 0
    rows = leaderboard.latest(db)
    assert {r["prompting"] for r in rows} == {"zero", "few:2"}
    md, page = leaderboard.write(db, tmp_path / "lb")
    assert "| tiny | zero | no |" in md.read_text()
    assert "data:image/png;base64," in page.read_text()


def test_cli_eval_and_leaderboard(tiny_lm, tmp_path, capsys):
    from lmforge.checkpoint import save_checkpoint

    checkpoint = save_checkpoint(tmp_path / "ckpt", tiny_lm.model, tiny_lm.tokenizer)
    task_file = tmp_path / "mine.jsonl"
    task_file.write_text("\n".join(json.dumps({"question": f"Is {w} an animal?", "choices": ["yes", "no"],
                                               "answer": a, "group": g})
                                   for w, a, g in [("fox", 0, "x"), ("dog", 0, "y"), ("rock", 1, "x"),
                                                   ("cloud", 1, "y")]) + "\n")
    db = tmp_path / "lb.sqlite"
    code = main(["eval", str(checkpoint), "--tasks", str(task_file), "--out", str(tmp_path / "ev"),
                 "--leaderboard", str(db), "--dtype", "fp32", "--bootstrap", "20"])
    assert code == 0
    out = capsys.readouterr().out
    assert "mine [zero] n=4: acc" in out
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    metrics = results["tasks"]["mine"]["zero"]["metrics"]
    assert "demographic_parity_difference" in metrics and "equalized_odds_difference" in metrics
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM scores").fetchone()[0] > 0
    assert main(["leaderboard", "--db", str(db), "--out", str(tmp_path / "lb")]) == 0
    assert (tmp_path / "lb" / "leaderboard.html").is_file()


def test_cli_eval_compile_gives_the_eager_replies(tiny_lm, tmp_path, capsys):
    """`lmforge eval --compile` compiles the engine's decode step before scoring, and `--prompt-lookup`
    decodes speculatively; both reply as the plain eager run."""
    from lmforge.checkpoint import save_checkpoint

    checkpoint = save_checkpoint(tmp_path / "ckpt", tiny_lm.model, tiny_lm.tokenizer)
    task_file = tmp_path / "say.jsonl"
    task_file.write_text("\n".join(json.dumps({"question": q, "answer": "fox"})
                                   for q in ["The quick brown", "Paris is the", "[1, 2,"]) + "\n")
    replies = {}
    for flags in ([], ["--compile"], ["--prompt-lookup", "2"]):
        out = tmp_path / "-".join(["run", *flags])
        assert main(["eval", str(checkpoint), "--tasks", str(task_file), "--out", str(out), "--leaderboard", "",
                     "--dtype", "fp32", "--bootstrap", "20", "--batch-size", "1", *flags]) == 0
        lines = (out / "samples" / "say.zero.jsonl").read_text().splitlines()
        replies[" ".join(flags)] = [json.loads(line)["reply"] for line in lines]
        assert json.loads((out / "results.json").read_text())["config"]["compile"] is ("--compile" in flags)
    assert "compiled in" in capsys.readouterr().out
    assert replies["--compile"] == replies[""] == replies["--prompt-lookup 2"] and any(replies[""])


def test_cli_eval_weights_scores_the_16_bit_model(tiny_lm, tmp_path):
    """`lmforge eval --weights fp16` scores the model with its weights rounded to fp16 (what
    `lmforge.load(..., weights="fp16")` gives, not the fp32 model) and keeps that in the config hash."""
    from lmforge.api import load
    from lmforge.checkpoint import save_checkpoint

    checkpoint = save_checkpoint(tmp_path / "ckpt", tiny_lm.model, tiny_lm.tokenizer)
    task_file = tmp_path / "pick.jsonl"
    task_file.write_text("\n".join(json.dumps({"question": q, "choices": [" fox", " dog", " [1, 2"], "answer": 0})
                                   for q in ["The quick brown", "Paris is the", "[1, 2,"]) + "\n")
    saved = {}
    for weights in ("fp32", "fp16"):
        out = tmp_path / weights
        assert main(["eval", str(checkpoint), "--tasks", str(task_file), "--out", str(out), "--leaderboard", "",
                     "--dtype", "fp32", "--bootstrap", "20", "--weights", weights]) == 0
        lines = (out / "samples" / "pick.zero.jsonl").read_text().splitlines()
        saved[weights] = (json.loads((out / "results.json").read_text()),
                          torch.tensor([json.loads(line)["loglikelihoods"] for line in lines]))
    expected = {}
    for weights in ("fp32", "fp16"):
        model = LocalModel(load(checkpoint, dtype="fp32", weights=weights, autotune=False), progress=False)
        config = EvalConfig(tasks=str(task_file), prompting="zero", leaderboard="", out="", bootstrap=20)
        records = evaluate(model, config, "tiny")["samples"]["pick.zero"]
        expected[weights] = torch.tensor([r["loglikelihoods"] for r in records])
    assert not torch.allclose(expected["fp16"], expected["fp32"], atol=1e-6, rtol=0)  # the rounding shows
    for weights in ("fp32", "fp16"):
        assert torch.allclose(saved[weights][1], expected[weights], atol=2e-5, rtol=0)
    assert saved["fp16"][0]["config"]["weights"] == "fp16"
    assert saved["fp16"][0]["config_hash"] != saved["fp32"][0]["config_hash"]


def test_generation_tasks_speculate_with_a_drafter_and_answer_as_plain(tiny_lm):
    """The harness's generation requests take the model's drafter: the guesses are checked (the engine
    counts them) and the answers are plain decoding's."""
    import dataclasses

    from lmforge.infer.speculative import PromptLookup

    prompts = ["Paris is the capital of France. Paris is", "true false null. true false", "[1, 2, 3] [1, 2,"]
    plain = LocalModel(tiny_lm, progress=False, batch_size=2, context=256).generate(prompts, ["\n\n"], 24)
    looked = LocalModel(dataclasses.replace(tiny_lm, drafter=PromptLookup()), progress=False, batch_size=2,
                        context=256)
    assert looked.generate(prompts, ["\n\n"], 24) == plain
    assert looked.engine.stats.accepted > 0


def test_cli_bad_input_exits_2_with_a_clear_message(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    cases = [(["--tasks", str(bad)], "bad.jsonl, line 1: field 'answer'"),
             (["--tasks", "no_such_task"], "unknown task 'no_such_task'"),
             (["--tasks", "pyref_mc", "--prompting", "many"], "unknown prompting strategy 'many'"),
             (["--tasks", "pyref_mc", "--base-url", "http://127.0.0.1:9"], "cannot reach"),
             (["--tasks", "pyref_mc", "--base-url", "http://127.0.0.1:9", "--compile"], "--compile is for a local"),
             (["--tasks", "pyref_mc", "--compile-prefill"], "add --compile"),
             (["--tasks", "pyref_mc", "--base-url", "http://127.0.0.1:9", "--prompt-lookup"], "for a local model"),
             (["--tasks", "pyref_mc", "--base-url", "http://127.0.0.1:9", "--weights", "fp16"], "for a local model"),
             (["--tasks", "pyref_mc", "--weights", "int3"], "--weights 'int3': choose fp32, fp16 or bf16")]
    for flags, message in cases:
        assert main(["eval", *flags, "--leaderboard", "", "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
    assert main(["leaderboard", "--db", str(tmp_path / "none.sqlite")]) == 2


def test_fairness_yes_no_task_gives_parity_and_odds_and_mixed_choice_counts_score(tiny_lm):
    from lmforge.eval.run import _score
    from lmforge.eval.tasks_builtin import builtin_task

    task = builtin_task("fairness_yn", limit=8)
    assert {i.group for i in task.test} == {"female", "male", "young", "elderly"}
    records = _score(LocalModel(tiny_lm, progress=False), task, task.test, Prompting("zero"), seed=0)
    metrics = aggregate("multiple_choice", records, iterations=20)
    says_yes = {g: [r["pred"] == 0 for r in records if r["group"] == g] for g in {r["group"] for r in records}}
    rates = [sum(v) / len(v) for v in says_yes.values()]  # P(answer "yes") per group: positive = the first choice
    assert metrics["demographic_parity_difference"]["value"] == pytest.approx(max(rates) - min(rates))
    assert 0 <= metrics["equalized_odds_difference"]["value"] <= 1
    mixed = [dict(records[0], probabilities=[0.2, 0.8], gold=1), dict(records[1], probabilities=[0.1, 0.1, 0.8], gold=2)]
    assert aggregate("multiple_choice", mixed, iterations=20)["brier"]["value"] == pytest.approx(
        ((0.2**2 + 0.2**2) + (0.1**2 + 0.1**2 + 0.2**2)) / 2)


def test_prompting_parse():
    assert Prompting.parse("few:5") == Prompting("few", 5) and Prompting.parse("few:5").label == "few:5"
    assert Prompting("task").for_task(Task("t", "generate", [], num_fewshot=3)) == Prompting("few", 3)
    assert Prompting("task").for_task(Task("t", "generate", [])) == Prompting("zero")
    for bad in ("few", "few:0", "two-shot"):
        with pytest.raises(Exception, match="prompting strategy"):
            Prompting.parse(bad)


def test_cli_human_report_and_export(tmp_path, capsys):
    from lmforge.eval.human import CRITERIA, RatingStore

    db = tmp_path / "ratings.sqlite"
    store = RatingStore(db)
    store.add_item("Capital of France?", "Paris.", "London.", model_a="good", model_b="bad")
    for rater in ("ann", "bob"):
        held = store.next_item(rater)
        left_is_a = held.side("left") == "a"
        best, worst = {c: 5 for c in CRITERIA}, {c: 1 for c in CRITERIA}
        scores = {"left": best, "right": worst} if left_is_a else {"left": worst, "right": best}
        store.rate(held.token, scores, preference="left" if left_is_a else "right")
    store.close()
    assert main(["eval", "human-report", str(db), "--out", str(tmp_path / "human.md")]) == 0
    report = capsys.readouterr().out
    assert "accuracy" in report and "good" in report and (tmp_path / "human.md").is_file()
    assert main(["eval", "human-export", str(db), "--out", str(tmp_path / "prefs.jsonl")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(line["chosen"] == "Paris." and line["rejected"] == "London." for line in lines)
    assert main(["eval", "human-report", str(tmp_path / "missing.sqlite")]) == 2


def test_cli_human_items_writes_two_models_answers_to_rate(tiny_lm, tmp_path):
    from lmforge.checkpoint import save_checkpoint
    from lmforge.eval.human import RatingStore

    checkpoint = save_checkpoint(tmp_path / "ckpt", tiny_lm.model, tiny_lm.tokenizer)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\nSay something about foxes.\n")
    items = tmp_path / "items.jsonl"
    assert main(["eval", "human-items", str(prompts), "--model", f"a={checkpoint}", "--model", f"b={checkpoint}",
                 "--out", str(items), "--max-new-tokens", "8"]) == 0
    lines = [json.loads(line) for line in items.read_text().splitlines()]
    assert [line["prompt"] for line in lines] == ["What is the capital of France?", "Say something about foxes."]
    assert all(line["models"] == ["a", "b"] and len(line["answers"]) == 2 for line in lines)
    store = RatingStore(tmp_path / "r.sqlite")
    assert store.import_jsonl(items) == 2
    store.close()
    assert main(["eval", "human-items", str(prompts), "--model", f"a={checkpoint}", "--model", f"b={checkpoint}",
                 "--model", f"c={checkpoint}", "--out", str(items)]) == 2


def test_an_encoder_decoder_is_scored_and_answers_through_the_engine(tiny_lm):
    """The harness runs an encoder-decoder as any model: a pair's context is the source, the continuation
    the target, its log-likelihood that of one teacher-forced pass; generation equals lm.generate."""
    import dataclasses

    from lmforge.model import ModelConfig, build_model

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tiny_lm.tokenizer.vocab_size, max_seq_len=128, dim=64, num_layers=2,
                         decoder_layers=2, num_heads=2, num_kv_heads=2, position="relative")
    lm = dataclasses.replace(tiny_lm, model=build_model(config).eval())
    model = LocalModel(lm, batch_size=2, progress=False)
    pairs = [("The quick brown fox jumps over the", " lazy dog"), ("The quick brown fox jumps over the", " cat"),
             ("Paris is", " the capital")]
    for (context, continuation), score in zip(pairs, model.loglikelihood(pairs)):
        source, target = model.pair_ids(context, continuation)
        with torch.no_grad():
            logits = lm.model(torch.tensor([source]), torch.tensor([[0, *target[:-1]]]))[0]
        reference = torch.log_softmax(logits.float(), dim=-1)
        assert score.tokens == len(target)
        assert score.logprob == pytest.approx(sum(float(reference[i, t]) for i, t in enumerate(target)), abs=1e-4)
    prompts = ["The quick brown", "Paris is"]
    assert model.generate(prompts, stop=["."], max_new_tokens=8) == \
           [lm.generate(p, max_new_tokens=8, temperature=0, stop=["."]) for p in prompts]


def test_a_task_name_from_a_file_cannot_write_outside_the_output_folder(tiny_lm, tmp_path, monkeypatch):
    import dataclasses

    import lmforge.eval.run as run

    escaping = dataclasses.replace(small_task(), name="../../escape")
    monkeypatch.setattr(run, "load_tasks", lambda spec, limit, seed: [escaping])
    config = EvalConfig(prompting="zero", out=str(tmp_path / "deep" / "out"), bootstrap=10)
    write_outputs(evaluate(LocalModel(tiny_lm, progress=False), config, "tiny"), config.out)
    written = [p.relative_to(tmp_path) for p in tmp_path.rglob("*escape*")]
    assert [str(p) for p in written] == ["deep/out/samples/-..-escape.zero.jsonl"]  # inside samples/, nowhere else
