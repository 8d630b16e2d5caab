"""The command line end to end on a tiny corpus: each command, and clear errors."""

import json

import pytest

import lmforge
from lmforge.cli import main

CORPUS = "\n\n".join(
    f"def function_{i}(value):\n    \"\"\"Return value times {i}.\"\"\"\n    return value * {i}\n" for i in range(300))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "corpus.md").write_text(CORPUS + "\n\n# 中文 and emoji 🙂\n", encoding="utf-8")
    assert main(["data", "prepare", str(root / "corpus.md"), "--out", str(root / "data"), "--quiet",
                 "--min-chars", "16", "--max-chars", "600", "--val-fraction", "0.1"]) == 0
    assert main(["tokenizer", "train", "--data", str(root / "data"), "--vocab-size", "400",
                 "--out", str(root / "tok.json"), "--quiet"]) == 0
    assert main(["data", "shard", "--data", str(root / "data"), "--tokenizer", str(root / "tok.json"),
                 "--out", str(root / "shards"), "--quiet"]) == 0
    return root


def test_pretrain_then_generate_and_resume(workdir, capsys):
    args = ["pretrain", "--shards", str(workdir / "shards"), "--tokenizer", str(workdir / "tok.json"),
            "--preset", "tiny", "--seq-len", "32", "--batch-size", "4", "--max-steps", "6", "--save-every", "3",
            "--eval-every", "3", "--eval-tokens", "256", "--out-dir", str(workdir / "run"), "--progress", "false",
            "--warmup-steps", "1"]
    assert main(args) == 0
    ckpt = workdir / "run" / "checkpoint"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 6
    assert json.loads((ckpt / "config.json").read_text())["vocab_size"] == 400
    assert main(args[:-4] + ["--max-steps", "6", "--resume"]) == 0  # already finished: resumes at step 6
    capsys.readouterr()
    assert main(["generate", str(ckpt), "def ", "--max-new-tokens", "8", "--temperature", "0", "--no-stream"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert main(["generate", str(ckpt), "def ", "--max-new-tokens", "8", "--weights", "fp16"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert main(["generate", str(ckpt), "def ", "--weights", "fp16", "--dtype", "bf16"]) == 2
    assert "fp32" in capsys.readouterr().err
    # Continued pretraining from that checkpoint starts where it ended, not from scratch.
    more = args[:-4] + ["--warmup-steps", "1", "--init-from", str(ckpt), "--out-dir", str(workdir / "more")]
    more[more.index("--max-steps") + 1] = "1"
    assert main(more) == 0

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r.get("kind") == "train"]

    # from scratch the first loss is about ln(400) = 6.0 nats (a uniform guess over the vocabulary)
    assert losses(workdir / "more")[0] < losses(workdir / "run")[-1] + 0.2 < 5.5


def test_pretrain_with_qat_writes_an_integer_checkpoint(workdir, capsys):
    args = ["pretrain", "--shards", str(workdir / "shards"), "--tokenizer", str(workdir / "tok.json"),
            "--preset", "tiny", "--seq-len", "32", "--batch-size", "4", "--max-steps", "3", "--eval-every", "3",
            "--eval-tokens", "256", "--out-dir", str(workdir / "qat"), "--progress", "false", "--warmup-steps", "1",
            "--qat", "int4"]
    assert main(args) == 0
    assert "quantized (int4 asymmetric, per group 32)" in capsys.readouterr().out
    spec = json.loads((workdir / "qat" / "quantized" / "quantization.json").read_text())
    assert (spec["bits"], spec["group_size"]) == (4, 32)
    assert main(["generate", str(workdir / "qat" / "quantized"), "def ", "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    assert main([*args, "--objective", "mlm", "--preset", "bert-tiny"]) == 2
    assert "--qat" in capsys.readouterr().err


def test_tokenize_prints_tokens_and_count(workdir, capsys):
    assert main(["tokenize", "def function_1(value):", "--tokenizer", str(workdir / "tok.json")]) == 0
    out = capsys.readouterr().out
    assert "function" in out and "tokens" in out
    assert main(["tokenize", "def x", "--tokenizer", str(workdir / "tok.json"), "--ids"]) == 0
    assert all(part.isdigit() for part in capsys.readouterr().out.split())


def test_model_info(capsys):
    assert main(["model", "info", "--preset", "tiny", "--num-kv-heads", "1"]) == 0
    out = capsys.readouterr().out
    assert "MQA" in out and "parameters" in out and "FLOPs per token" in out


@pytest.mark.parametrize("argv, message", [
    (["model", "info", "--preset", "nope"], "unknown model preset"),
    (["model", "info", "--num-heads", "5"], "not divisible"),
    (["tokenize", "x", "--tokenizer", "/nonexistent/tok.json"], "tokenizer not found"),
    (["data", "prepare", "/nonexistent/file.txt", "--out", "/tmp/lmforge-never"], "/nonexistent/file.txt"),
    (["generate", "/nonexistent", "hi"], "not an lmforge checkpoint"),
])
def test_bad_input_exits_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "lmforge: error:" in err and message in err


def test_broken_jsonl_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a fine line of text that is long enough to keep around"}\n{"text": broken\n')
    assert main(["data", "prepare", str(bad), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert f"{bad}:2" in capsys.readouterr().err


@pytest.mark.slow
def test_speedrun_writes_a_report(tmp_path):
    assert main(["speedrun", "--runs-dir", str(tmp_path), "--name", "t", "--preset", "tiny", "--minutes", "0.3",
                 "--max-bytes", "300000", "--vocab-size", "512", "--seq-len", "64", "--batch-size", "8",
                 "--sft-tasks", "200", "--eval-tasks", "10", "--leaderboard-items", "6", "--progress", "false"]) == 0
    run = tmp_path / "t"
    report = (run / "report.md").read_text()
    for section in ("## Corpus", "## Tokenizer", "## Model", "## Training", "## Evaluation",
                    "## From base model to assistant", "| identity |", "## From assistant to aligned model",
                    "## On the leaderboard", "## Samples"):
        assert section in report
    summary = json.loads((run / "summary.json").read_text())
    assert summary["training"]["steps"] > 0 and summary["final_eval"]["val_bpb"] > 0
    sft = summary["sft"]
    assert sft["steps"] > 0 and sft["pretrain_val_after_sft"]["val_loss"] > 0
    assert set(sft["task_accuracy_before"]["accuracy"]) == set(sft["task_accuracy_after"]["accuracy"])
    align = summary["align"]
    assert align["method"] == "grpo" and align["steps"] > 0 and align["config"]["model"] == sft["model"]
    assert align["task_accuracy_before"]["accuracy"] == sft["task_accuracy_after"]["accuracy"]  # the same tasks
    assert "ci95" in align["task_accuracy_gain"]
    for path in ("data/manifest.json", "tokenizer.json", "shards/train.bin", "train/checkpoint/model.safetensors",
                 "train/loss.png", "sft/model/model.safetensors", "sft/loss.png", "align/model/model.safetensors",
                 "align/rewards.png", "eval/chat/report.md"):
        assert (run / path).exists(), path
    from lmforge.eval.leaderboard import latest

    board = {(r["model"], r["task"]) for r in latest(tmp_path / "leaderboard.sqlite")}
    assert {("t/base", "pyref_mc"), ("t/chat", "verifiable"), ("t/chat", "pyref_ppl")} <= board
    assert summary["leaderboard"]["chat"]["verifiable"]["zero"]["exact_match_flexible"] >= 0
    # the speedrun's models open in the inspector (its page is written with the base model's inspection)
    for model in ("train/checkpoint", "align/model"):
        assert main(["inspect", str(run / model), "def f(x):\n    return x", "--kv-steps", "2", "--quiet",
                     "--html", str(tmp_path / "inspect.html")]) == 0


def test_export_import_and_generate_from_hugging_face_and_gguf(workdir, capsys):
    transformers = pytest.importorskip("transformers")
    import torch

    from lmforge.checkpoint import save_checkpoint
    from lmforge.model import DecoderLM, preset
    from lmforge.tokenizer import END_OF_TURN, SPECIAL_IDS, Tokenizer

    torch.manual_seed(0)
    tokenizer = Tokenizer.from_file(workdir / "tok.json")
    model = DecoderLM(preset("tiny", vocab_size=tokenizer.vocab_size, init_std=0.3)).eval()
    save_checkpoint(workdir / "ckpt", model, tokenizer)
    assert main(["export", str(workdir / "ckpt"), str(workdir / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(workdir / "hf").eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(workdir / "hf")
    text = "def function_7(value):\n    return value * 7  # 中文 🙂"
    assert hf_tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    assert hf_tokenizer.encode(text) == tokenizer.encode(text, add_bos=True)  # framed as lmforge frames prompts
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.inference_mode():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-4, atol=1e-5)

    generation = transformers.GenerationConfig.from_pretrained(workdir / "hf")
    assert set(generation.eos_token_id) == {tokenizer.eos_id, SPECIAL_IDS[END_OF_TURN]}  # a chat reply ends there
    assert main(["import", str(workdir / "hf"), "--out", str(workdir / "back")]) == 0
    assert main(["export", str(workdir / "ckpt"), str(workdir / "m.gguf"), "--format", "gguf",
                 "--gguf-type", "f32"]) == 0
    outputs = []
    for source in ("ckpt", "hf", "back", "m.gguf"):
        capsys.readouterr()
        assert main(["generate", str(workdir / source), "def ", "--max-new-tokens", "8", "--temperature", "0",
                     "--no-stream"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] == outputs[2] == outputs[3]
    assert main(["import", str(workdir / "data"), "--out", str(workdir / "nope")]) == 2
    assert "neither a Hugging Face model directory" in capsys.readouterr().err


def test_generate_a_jsonl_file_through_the_batched_engine(workdir, capsys):
    import torch

    from lmforge.api import load
    from lmforge.checkpoint import save_checkpoint
    from lmforge.model import DecoderLM, preset
    from lmforge.tokenizer import Tokenizer

    torch.manual_seed(1)
    tokenizer = Tokenizer.from_file(workdir / "tok.json")
    save_checkpoint(workdir / "batch", DecoderLM(preset("tiny", vocab_size=tokenizer.vocab_size, init_std=0.3)),
                    tokenizer)
    records = [{"prompt": "def "}, {"prompt": "return value", "max_new_tokens": 3},
               {"messages": [{"role": "user", "content": "hi"}]}, {"prompt": "x", "temperature": 0.9, "seed": 4}]
    (workdir / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    assert main(["generate", str(workdir / "batch"), "--input", str(workdir / "prompts.jsonl"), "--output",
                 str(workdir / "out.jsonl"), "--max-new-tokens", "6", "--temperature", "0", "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in (workdir / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3, 4] and rows[1]["completion_tokens"] <= 3
    lm = load(workdir / "batch")  # each line equals that prompt generated alone
    assert rows[0]["completion"] == lm.generate("def ", max_new_tokens=6, temperature=0)
    assert rows[2]["completion"] == lm.chat(records[2]["messages"], max_new_tokens=6, temperature=0)
    assert rows[3]["completion"] == lm.generate("x", max_new_tokens=6, temperature=0.9, seed=4)
    assert "tokens/s" in capsys.readouterr().err
    (workdir / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b", "temperature": -1}\n', encoding="utf-8")
    assert main(["generate", str(workdir / "batch"), "--input", str(workdir / "bad.jsonl")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    (workdir / "bad.jsonl").write_text('{"prompt": "a"}\n{oops\n', encoding="utf-8")
    assert main(["generate", str(workdir / "batch"), "--input", str(workdir / "bad.jsonl")]) == 2
    assert "bad.jsonl:2: invalid JSON" in capsys.readouterr().err


def test_pretrain_an_encoder_decoder_by_span_corruption_then_fill_in_a_span(workdir, capsys):
    run = workdir / "span"
    args = ["pretrain", "--objective", "span", "--shards", str(workdir / "shards"), "--tokenizer",
            str(workdir / "tok.json"), "--preset", "t5-tiny", "--seq-len", "32", "--batch-size", "4",
            "--max-steps", "4", "--save-every", "2", "--eval-every", "2", "--eval-tokens", "256", "--out-dir", str(run),
            "--progress", "false", "--warmup-steps", "1"]
    assert main(args) == 0
    config = json.loads((run / "checkpoint" / "config.json").read_text())
    assert (config["decoder_layers"], config["position"], config["vocab_size"]) == (2, "relative", 400 + 100)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("span_accuracy" in r for r in rows if r.get("kind") == "train")
    assert [r["step"] for r in rows if "val_span_accuracy" in r] == [2, 4]
    assert main(args + ["--resume"]) == 0  # finished: resumes at its last step
    capsys.readouterr()
    # the decoder writes sentinels (ids above the tokenizer's) as <extra_id_i>; the prompt is not echoed
    assert main(["generate", str(run / "checkpoint"), "def function_1(<extra_id_0>):", "--max-new-tokens", "6",
                 "--temperature", "0", "--no-stream"]) == 0
    out = capsys.readouterr().out
    assert not out.startswith("def function_1") and "<extra_id_" in out
    assert main(["generate", str(run / "checkpoint"), "x", "--num-beams", "2", "--temperature", "0",
                 "--max-new-tokens", "4"]) == 0
    lm = lmforge.load(run / "checkpoint", device="cpu", dtype="fp32")  # many prompts: the batched engine
    prompts = ["def function_1(<extra_id_0>):", "x", "return <extra_id_0> + 1"]
    assert [c.text for c in lm.generate_batch(prompts, max_new_tokens=6, temperature=0)] == \
           [lm.generate(p, max_new_tokens=6, temperature=0) for p in prompts]
    # compiled: the batched engine's decode step (at batch 1 for one prompt), the same targets
    compiled = lmforge.load(run / "checkpoint", device="cpu", dtype="fp32", compile=True, autotune=False)
    assert [compiled.generate(p, max_new_tokens=6, temperature=0) for p in prompts[:2]] == \
           [lm.generate(p, max_new_tokens=6, temperature=0) for p in prompts[:2]]
    assert main(["generate", str(run / "checkpoint"), "x", "--compile", "--prompt-lookup", "2"]) == 2
    assert "encoder-decoder" in capsys.readouterr().err
    assert main(["quantize", str(run / "checkpoint"), "--out", str(workdir / "span-int8")]) == 2
    assert "decoder-only" in capsys.readouterr().err
    # a decoder-only preset for span corruption, or an encoder-decoder for next-token prediction: exit 2
    assert main([a if a != "t5-tiny" else "tiny" for a in args]) == 2
    assert main([a for a in args if a not in ("--objective", "span")] + ["--out-dir", str(workdir / "x")]) == 2
    assert capsys.readouterr().err.count("encoder-decoder") == 1


def test_pretrain_an_encoder_with_masked_tokens_then_embed(workdir, capsys):
    run = workdir / "mlm"
    args = ["pretrain", "--objective", "mlm", "--nsp", "--shards", str(workdir / "shards"), "--tokenizer",
            str(workdir / "tok.json"), "--preset", "bert-tiny", "--seq-len", "32", "--batch-size", "4",
            "--max-steps", "4", "--eval-every", "2", "--eval-tokens", "256", "--out-dir", str(run),
            "--progress", "false", "--warmup-steps", "1"]
    assert main(args) == 0
    config = json.loads((run / "checkpoint" / "config.json").read_text())
    assert (config["causal"], config["head"], config["norm_position"]) == (False, "mlm+nsp", "post")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("nsp_loss" in r and "mlm_accuracy" in r for r in rows if r.get("kind") == "train")
    assert any("val_mlm_accuracy" in r for r in rows)
    capsys.readouterr()
    assert main(["embed", str(run / "checkpoint"), "def function_1(value):", "return value * 2"]) == 0
    out = capsys.readouterr().out
    assert "dim 64" in out and "cosine" in out
    # the wrong model for the objective, or --nsp without it: exit 2 with the reason
    bad = ["tiny" if a == "bert-tiny" else str(workdir / "bad") if a == str(run) else a for a in args if a != "--nsp"]
    assert main(bad) == 2
    assert "encoder" in capsys.readouterr().err
    assert main(["pretrain", "--nsp", *args[4:8]]) == 2
    assert "--objective mlm" in capsys.readouterr().err
