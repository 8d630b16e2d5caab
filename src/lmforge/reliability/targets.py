"""The readers under fuzzing, each reached the way a command reaches it.

Every target's ``seed`` writes a small valid input (a tiny model, a few records) and returns the one
file to damage; ``read`` does what the command does with it, down to the first use of what it read (a
checkpoint is loaded into a model and run, a tokenizer encodes and decodes, a shard's ids are checked
against its vocabulary), so a value that passes the reader but breaks its user is found too.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from lmforge.errors import InputError
from lmforge.reliability.fuzz import Target, pick

TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France. 数字 12345, "
        "def add(a, b):\n    return a + b\n") * 8
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "5"}]


@functools.cache
def tokenizer():
    """lmforge's byte-level BPE with 300 ids, trained once per process."""
    from lmforge.tokenizer import train_tokenizer

    return train_tokenizer([TEXT], 300, progress=False)


def _model(**overrides):
    from lmforge.model import DecoderLM, preset

    torch.manual_seed(0)
    config = preset("tiny", vocab_size=tokenizer().vocab_size, max_seq_len=64, **overrides)
    return DecoderLM(config).eval()


def _write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _run_model(model, vocab_size: int) -> None:
    """One forward pass on a few ids: what a command does first with the model it loaded."""
    ids = torch.arange(min(8, vocab_size)).unsqueeze(0) % max(1, vocab_size)
    with torch.inference_mode():
        logits = model(ids)
    assert logits.shape[-1] == vocab_size, f"logits of width {logits.shape[-1]} for vocab {vocab_size}"


# -- model files --------------------------------------------------------------------------------------------

def _checkpoint(folder: Path, **overrides) -> Path:
    from lmforge.checkpoint import save_checkpoint

    save_checkpoint(folder / "ckpt", _model(**overrides), tokenizer())
    return folder / "ckpt"


def _load_and_run(ckpt: Path) -> None:
    from lmforge.checkpoint import load_model, load_tokenizer

    model = load_model(ckpt)
    tok = load_tokenizer(ckpt)
    _run_model(model, model.config.vocab_size)
    tok.decode(tok.encode(TEXT[:80]))


def _safetensors_seed(folder: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"a": torch.arange(12, dtype=torch.float32).view(3, 4), "b": torch.ones(5, dtype=torch.bfloat16),
               "c": torch.arange(6, dtype=torch.int64)}, folder / "t.safetensors")
    return folder / "t.safetensors"


def _hf_seed(folder: Path, damaged: str) -> Path:
    """A tiny model exported as a transformers directory (Llama layout), its weights in two shards with an
    index, as large models are."""
    from safetensors.torch import load_file, save_file

    from lmforge.interop.convert import export_checkpoint

    export_checkpoint(_checkpoint(folder), folder / "hf")
    tensors = load_file(folder / "hf" / "model.safetensors")
    (folder / "hf" / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, folder / "hf" / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: file for file, part in shards.items() for n in part}}
    (folder / "hf" / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder / "hf" / damaged


def _embedder_seed(folder: Path) -> Path:
    """An encoder (BERT layout) laid out as a sentence-transformers folder: modules.json, a pooling module,
    sentence_bert_config.json."""
    from lmforge.checkpoint import save_checkpoint
    from lmforge.model import DecoderLM, preset

    torch.manual_seed(0)
    model = DecoderLM(preset("bert-tiny", vocab_size=tokenizer().vocab_size, head="hidden")).eval()
    save_checkpoint(folder / "encoder", model, tokenizer())
    (folder / "encoder" / "1_Pooling").mkdir()
    (folder / "encoder" / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    (folder / "encoder" / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 96}))
    (folder / "encoder" / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    return folder / "encoder" / "modules.json"


def _embedder_read(path: Path) -> None:
    from lmforge.embed import load

    vectors = load(path.parent, device="cpu").encode(["Paris is the capital of France.", "a fox"])
    assert vectors.shape[0] == 2


def _safetensors_read(path: Path) -> None:
    from lmforge.interop.hf import mmap_safetensors

    for tensor in mmap_safetensors(path).values():
        tensor.double().sum()  # every byte of every tensor lies inside the file


def _trainer_seed(folder: Path, damaged: str) -> Path:
    from lmforge.checkpoint import save_checkpoint
    from lmforge.train.loop import _resume_tensors
    from lmforge.train.optim import build_optimizer

    model = _model()
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    model(torch.arange(8).unsqueeze(0)).sum().backward()
    optimizer.step()
    save_checkpoint(folder / "ckpt", model, tokenizer(), {"step": 3, "max_steps": 10, "tokens": 96, "elapsed": 1.5},
                    _resume_tensors(optimizer))
    return folder / "ckpt" / damaged


def _trainer_read(path: Path) -> None:
    """What ``--resume`` does: weights, optimizer moments and RNG back, then the next step is taken."""
    from lmforge.runtime import Runtime
    from lmforge.train.loop import _restore
    from lmforge.train.optim import build_optimizer

    model = _model()
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    rng = torch.get_rng_state()
    try:
        step, max_steps, elapsed = _restore(path.parent, model, optimizer, Runtime.resolve("cpu", "fp32"))
        assert isinstance(step, int) and isinstance(max_steps, int) and 0 <= step <= max_steps, (step, max_steps)
        float(elapsed)
        model(torch.randint(0, model.config.vocab_size, (1, 8))).sum().backward()
        optimizer.step()
    finally:
        torch.set_rng_state(rng)  # the fuzzing process's own draws stay its own


def _gguf_seed(folder: Path) -> Path:
    from lmforge.interop.gguf import save_gguf

    folder.mkdir(parents=True, exist_ok=True)
    model = _model(tie_embeddings=False)
    save_gguf(folder / "m.gguf", model.config, dict(model.state_dict()), tokenizer(), "q8_0")
    return folder / "m.gguf"


def _gguf_read(path: Path) -> None:
    from lmforge.interop import gguf

    gguf._reader.cache_clear()  # each damaged file is read afresh (the cache keys on path and mtime)
    _load_and_run(path)


def _lora_seed(folder: Path, damaged: str) -> Path:
    from lmforge.peft.lora import LoraConfig, apply_lora, save_adapter

    model = _model()
    apply_lora(model, LoraConfig(rank=2, alpha=4, targets=["q_proj", "v_proj"]))
    save_adapter(model, folder / "adapter")
    return folder / "adapter" / damaged


def _lora_read(path: Path) -> None:
    from lmforge.peft.lora import load_adapter

    model = load_adapter(_model(), path.parent)
    _run_model(model, model.config.vocab_size)


def _quantized_seed(folder: Path) -> Path:
    from lmforge.quant.integer import QUANT_FILE, QuantSpec
    from lmforge.quant.ptq import quantize_checkpoint

    ckpt = _checkpoint(folder / "float")
    quantize_checkpoint(ckpt, folder / "q", QuantSpec(bits=8), eval_chars=0, eval_items=0)
    return folder / "q" / QUANT_FILE


# -- tokenizers ------------------------------------------------------------------------------------------------

def _tokenizer_seed(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer().save(folder / "tokenizer.json")
    return folder / "tokenizer.json"


def _tokenizer_read(path: Path) -> None:
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.from_file(path)
    tok.decode(tok.encode(TEXT[:120]))


def _template_seed(folder: Path) -> Path:
    from lmforge.tokenizer.pretrained import CONFIG_FILE, PretrainedTokenizer

    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    pretrained = PretrainedTokenizer(tokenizer().hf, {"chat_template": template, "eos_token": "<|end_of_turn|>",
                                                      "bos_token": None}, None, source="fuzz")
    pretrained.save(folder / "tok")
    return folder / "tok" / CONFIG_FILE


def _template_read(path: Path) -> None:
    from lmforge.tokenizer.chat import render_chat
    from lmforge.tokenizer.pretrained import PretrainedTokenizer

    render_chat(PretrainedTokenizer.from_dir(path.parent), MESSAGES, add_generation_prompt=True)


# -- data files ---------------------------------------------------------------------------------------------------

def _documents_read(path: Path) -> None:
    from lmforge.data.sources import iter_documents

    for document in iter_documents(str(path)):
        assert isinstance(document.text, str)


def _parquet_seed(folder: Path, rows: list[dict], name: str) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / name)
    return folder / name


CHATS = [{"messages": MESSAGES}, {"prompt": "Name a colour.", "completion": "Blue."},
         {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]


def _chat_read(path: Path) -> None:
    from lmforge.data.chat_records import iter_chat_records
    from lmforge.tokenizer.chat import render_chat

    for messages in iter_chat_records(path):
        render_chat(tokenizer(), messages)


def _shard_seed(folder: Path, damaged: str) -> Path:
    from lmforge.data.prepare import DataConfig, prepare_data
    from lmforge.data.shards import write_shards

    source = folder / "raw.txt"
    folder.mkdir(parents=True, exist_ok=True)
    source.write_text("\n\n".join(f"Document {i}. " + TEXT[i:] for i in range(12)), encoding="utf-8")
    prepare_data([str(source)], folder / "prepared", DataConfig(min_chars=8, val_fraction=0.3), progress=False)
    if damaged == "manifest.json":
        return folder / "prepared" / damaged
    write_shards(folder / "prepared", tokenizer(), folder / "shards", progress=False)
    return folder / "shards" / damaged


def _shard_read(path: Path) -> None:
    from lmforge.data.shards import load_shard, read_meta

    for split in ("train", "val"):
        tokens = load_shard(path.parent, split)
        vocab = read_meta(path.parent)["vocab_size"]
        assert len(tokens) == 0 or int(tokens.max()) < vocab, "a token id past the shard's vocabulary"


def _manifest_read(path: Path) -> None:
    from lmforge.data.prepare import prepared_split_path, read_manifest

    manifest = read_manifest(path.parent)
    for split in ("train", "val"):
        prepared_split_path(path.parent, split)
    assert isinstance(manifest, dict)


def _preferences_read(path: Path) -> None:
    from lmforge.data.preferences import read_preferences

    read_preferences(path)


def _task_read(path: Path) -> None:
    from lmforge.eval.task_file import load_task_file

    task = load_task_file(path)
    for item in task.test + task.train:
        assert isinstance(item.question, str) and all(isinstance(c, str) for c in item.choices)


TASK_YAML = """name: capitals
kind: multiple_choice
template: "Q: {question}\\nA:"
num_fewshot: 1
metrics: [acc, acc_norm]
items:
  - {question: "Capital of France?", choices: [Paris, Rome, Oslo], answer: 0, group: europe}
  - {question: "Capital of Japan?", choices: [Kyoto, Tokyo], answer: 1, group: asia}
train_items:
  - {question: "Capital of Italy?", choices: [Rome, Milan], answer: 0, group: europe}
"""


def _questions_read(path: Path) -> None:
    from lmforge.rag.evaluate import read_questions

    read_questions(path)


def _ratings_read(path: Path) -> None:
    from lmforge.eval.human import RatingStore, human_report

    store = RatingStore(path.parent / "fresh.sqlite")
    try:
        store.import_jsonl(path)
        human_report(store)
    finally:
        store.close()
        (path.parent / "fresh.sqlite").unlink(missing_ok=True)


# -- stores --------------------------------------------------------------------------------------------------------

def _rating_store_seed(folder: Path) -> Path:
    from lmforge.eval.human import CRITERIA, RatingStore

    folder.mkdir(parents=True, exist_ok=True)
    store = RatingStore(folder / "ratings.sqlite")
    store.add_item("What is 2 + 3?", "5", "6", "a", "b")
    store.add_item("Capital of France?", "Paris")
    assignment = store.next_item("ann")
    scores = {criterion: 4 for criterion in CRITERIA}
    if assignment.item.is_pair:
        store.rate(assignment.token, {"left": scores, "right": scores}, preference="left")
    else:
        store.rate(assignment.token, {"left": scores})
    store.close()
    return folder / "ratings.sqlite"


def _rating_store_read(path: Path) -> None:
    from lmforge.eval.human import RatingStore, human_report

    store = RatingStore(path)
    try:
        human_report(store)
        store.next_item("bob")
    finally:
        store.close()


def _leaderboard_seed(folder: Path) -> Path:
    from lmforge.eval import leaderboard

    folder.mkdir(parents=True, exist_ok=True)
    results = {"model": "tiny", "config_hash": "abc", "tasks": {"arith": {"zero-shot": {
        "n": 10, "metrics": {"acc": {"value": 0.5, "stderr": 0.1}, "f1": {"value": 0.25, "stderr": None}}}}}}
    leaderboard.record(folder / "leaderboard.sqlite", results, run_id="r1")
    return folder / "leaderboard.sqlite"


def _leaderboard_read(path: Path) -> None:
    from lmforge.eval import leaderboard

    rows = leaderboard.latest(path)
    leaderboard.markdown(rows)
    leaderboard.html_page(rows)


def _knowledge_seed(folder: Path, damaged: str) -> Path:
    import numpy as np

    from lmforge.rag.chunk import Chunk
    from lmforge.rag.store import write_knowledge_base

    texts = ["Paris is the capital of France.", "The fox jumps over the dog.", "def add(a, b): return a + b"]
    chunks = [("doc.md", Chunk(id=f"doc.md#{i}", source="doc.md", title="Doc", start=i * 40, end=i * 40 + len(t),
                               text=t, tokens=len(t.split()))) for i, t in enumerate(texts)]
    vectors = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    write_knowledge_base(folder / "kb", {"embedder": "fuzz", "dimension": 8}, {"doc.md": "hash"}, chunks, vectors,
                         ann=True)
    return folder / "kb" / damaged


def _knowledge_read(path: Path) -> None:
    import numpy as np

    from lmforge.rag.retrieve import Retriever
    from lmforge.rag.store import KnowledgeBase

    kb = KnowledgeBase(path.parent if path.parent.name != "bm25" else path.parent.parent)
    query = np.ones(kb.vectors.shape[1], dtype=np.float32)
    Retriever(kb).bm25_scores("capital of France")
    kb.vectors @ query
    if kb.ann is not None:
        kb.ann.search(query, 2)


# -- the server ------------------------------------------------------------------------------------------------------

@functools.cache
def _client():
    """A test client of the OpenAI-compatible app on a tiny model, started once (its engine thread runs)."""
    from fastapi.testclient import TestClient

    from lmforge.api import LanguageModel
    from lmforge.runtime import Runtime
    from lmforge.serve.app import create_app
    from lmforge.serve.served_model import ServedModel

    lm = LanguageModel(_model(), tokenizer(), Runtime.resolve("cpu", "fp32"))
    client = TestClient(create_app({"tiny": ServedModel("tiny", lm, max_batch_size=4)}))
    client.__enter__()
    return client


ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "inspect": "/v1/inspect"}
BODIES = {
    "chat": {"model": "tiny", "messages": MESSAGES[:2], "max_tokens": 4, "temperature": 0.7, "top_p": 0.9,
             "top_k": 5, "seed": 1, "stop": ["\n"], "n": 1, "logprobs": True, "top_logprobs": 2},
    "completions": {"model": "tiny", "prompt": ["Paris is", "The fox"], "max_tokens": 3, "temperature": 0,
                    "echo": True, "logprobs": 2, "stop": "."},
    "inspect": {"model": "tiny", "text": "Paris is the capital", "layer": 0, "head": 1, "position": 2,
                "temperature": 0.8, "top_k": 4, "views": ["tokens", "attention", "next"]},
}


def _http_seed(name: str):
    def seed(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps(BODIES[name]), encoding="utf-8")
        return folder / f"{name}.json"
    return seed


def _http_read(path: Path) -> None:
    """Send the damaged body; the server must answer below 500 (a 4xx says what was wrong, as JSON) and
    keep answering."""
    answer = _client().post(ENDPOINTS[path.stem], content=path.read_bytes(),
                            headers={"content-type": "application/json"})
    assert answer.status_code < 500, f"{answer.status_code}: {answer.text[:200]}"
    if answer.status_code >= 400:
        message = answer.json()["error"]["message"]
        assert isinstance(message, str) and message, answer.text[:200]
        raise InputError(f"{path.name}: {answer.status_code} {message}")


# -- the list -------------------------------------------------------------------------------------------------------

def _file(name: str, write):
    """A seed that writes one file ``name`` with ``write(path)``."""
    def seed(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        write(folder / name)
        return folder / name
    return seed


def _text(name: str, text: str):
    return _file(name, lambda path: path.write_text(text, encoding="utf-8"))


def _records(name: str, records: list):
    return _file(name, lambda path: _write_jsonl(path, records))


@functools.cache
def _loaded(checkpoint: str):
    from lmforge.api import load

    return load(checkpoint, device="cpu")


def _prompts_seed(folder: Path) -> Path:
    _checkpoint(folder)
    return _write_jsonl(folder / "prompts.jsonl", [{"prompt": "The quick brown"},
                                                   {"messages": MESSAGES[:2], "temperature": 0.7, "seed": 3}])


def _generate_read(path: Path) -> None:
    """``lmforge generate CKPT --input PROMPTS --output OUT``: every line checked, then generated."""
    from lmforge.cli import _generate_jsonl, make_parser

    args = make_parser().parse_args(["generate", str(path.parent / "ckpt"), "--input", str(path), "--output",
                                     str(path.parent / "out.jsonl"), "--max-new-tokens", "4"])
    _generate_jsonl(_loaded(str(path.parent / "ckpt")), args)


def _calibration_read(path: Path) -> None:
    from lmforge.quant.ptq import calibration_batches

    for batch in calibration_batches(tokenizer(), path, tokens=256, window=64):
        assert batch.dim() == 2 and int(batch.max()) < tokenizer().vocab_size


def _metrics_read(path: Path) -> None:
    """What ``--resume`` does with metrics.jsonl: read it, keep the lines up to the checkpoint's step."""
    from lmforge.train.metrics import MetricsLog, read_metrics

    read_metrics(path)
    MetricsLog(path, keep_until_step=3)


def _trace_seed(folder: Path) -> Path:
    from lmforge.agent.loop import AgentConfig

    _checkpoint(folder)
    config = json.loads(json.dumps(__import__("dataclasses").asdict(AgentConfig(max_steps=4))))
    call = {"id": "call_0", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "2+3"}'}}
    return _write_jsonl(folder / "trace.jsonl", [
        {"event": "start", "question": "What is 2 + 3?", "model": "tiny", "tools": ["calculator"], "config": config,
         "messages": MESSAGES[:2]},
        {"event": "model", "step": 0, "reply": {"role": "assistant", "content": None, "tool_calls": [call]},
         "text": "<tool_call>", "prompt_tokens": 30, "completion_tokens": 9, "malformed": False},
        {"event": "tool", "step": 0, "id": "call_0", "name": "calculator", "arguments": {"expression": "2+3"},
         "content": "5", "ok": True, "error": None},
        {"event": "note", "step": 1, "role": "user", "content": "Answer now.", "kind": "answer"}])


def _trace_read(path: Path) -> None:
    """``lmforge agent --resume TRACE``: the trace read, its run replayed and taken to its end by a local
    chat backend (the tiny model's chat template renders every message, as it does to count tokens) whose
    every turn answers at once through final_answer."""
    from lmforge.agent import Agent
    from lmforge.agent.backend import LocalChat, Reply
    from lmforge.agent.builtin import calculator
    from lmforge.agent.tools import Toolbox

    class Answers(LocalChat):
        def complete(self, messages, tools, **_):
            self.count_tokens(messages, tools)
            call = {"id": "call_end", "type": "function",
                    "function": {"name": "final_answer", "arguments": '{"answer": "5"}'}}
            return Reply(content=None, tool_calls=[call], completion_tokens=5)

    Agent(Answers(_loaded(str(path.parent / "ckpt"))), Toolbox([calculator])).resume(path)


def _prompts_read(path: Path) -> None:
    from lmforge.eval.human import read_prompts

    assert all(isinstance(p, str) for p in read_prompts(path))


def _pdf_seed(folder: Path) -> Path:
    """A one-page PDF with a line of text (Helvetica), its cross-reference table at the right offsets."""
    stream = b"BT /F1 12 Tf 72 720 Td (The quick brown fox jumps over the lazy dog.) Tj ET"
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    data, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(data))
        data += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(data)
    data += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    data += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    data += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "doc.pdf").write_bytes(bytes(data))
    return folder / "doc.pdf"


def _rag_documents_read(path: Path) -> None:
    """What ``lmforge rag index`` does with one file: read it, clean it, cut it into chunks."""
    import logging

    from lmforge.rag.chunk import chunk_document
    from lmforge.rag.documents import read_documents

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings about each repaired damage
    for document in read_documents(path):
        for chunk in chunk_document(document, lambda text: len(tokenizer().encode(text)), max_tokens=32, overlap=4):
            assert isinstance(chunk.text, str)


HTML = ("<html><head><title>Notes</title><style>p {color: red}</style></head><body><h1>Foxes</h1>"
        "<p>The quick brown fox &amp; the lazy dog.</p><ul><li>Paris</li><li>数字 12345</li></ul>"
        "<script>var x = 1;</script><pre>def add(a, b):\n    return a + b</pre></body></html>")


def targets() -> list[Target]:
    """Every reader under fuzzing."""
    return [
        Target("safetensors", "a .safetensors file (lmforge's memory-mapped reader)", _safetensors_seed,
               _safetensors_read),
        Target("checkpoint-weights", "model.safetensors of a checkpoint: load, run",
               lambda f: _checkpoint(f) / "model.safetensors", lambda p: _load_and_run(p.parent)),
        Target("checkpoint-config", "config.json of a checkpoint: load, run",
               lambda f: _checkpoint(f) / "config.json", lambda p: _load_and_run(p.parent)),
        Target("hf-config", "config.json of a transformers model directory (Llama layout): load, run",
               lambda f: _hf_seed(f, "config.json"), lambda p: _load_and_run(p.parent)),
        Target("hf-index", "model.safetensors.index.json of a sharded transformers directory: load, run",
               lambda f: _hf_seed(f, "model.safetensors.index.json"), lambda p: _load_and_run(p.parent)),
        Target("sentence-transformers", "modules.json of a sentence-transformers folder: load, embed two texts",
               _embedder_seed, _embedder_read),
        Target("tokenizer-json", "tokenizer.json (lmforge BPE): read, encode, decode", _tokenizer_seed,
               _tokenizer_read),
        Target("chat-template", "tokenizer_config.json with a Jinja chat template: read, render a conversation",
               _template_seed, _template_read),
        Target("pretrained-tokenizer", "tokenizer.json of an imported model's tokenizer (tokenizers' own format): "
               "read, render a conversation", lambda f: _template_seed(f).with_name("tokenizer.json"), _template_read),
        Target("trainer-state", "trainer_state.json of a checkpoint: --resume, one more step",
               lambda f: _trainer_seed(f, "trainer_state.json"), _trainer_read),
        Target("optimizer-state", "optimizer.safetensors of a checkpoint: --resume, one more step",
               lambda f: _trainer_seed(f, "optimizer.safetensors"), _trainer_read),
        Target("gguf", "a GGUF file (q8_0 weights and tokenizer): load, run", _gguf_seed, _gguf_read),
        Target("lora-config", "adapter_config.json of a LoRA adapter: put it on its base, run",
               lambda f: _lora_seed(f, "adapter_config.json"), _lora_read),
        Target("lora-weights", "adapter_model.safetensors of a LoRA adapter: put it on its base, run",
               lambda f: _lora_seed(f, "adapter_model.safetensors"), _lora_read),
        Target("quantized-spec", "quantization.json of an int8 checkpoint: load, run", _quantized_seed,
               lambda p: _load_and_run(p.parent)),
        Target("shard-meta", "meta.json of a token shard folder: load both splits, check ids",
               lambda f: _shard_seed(f, "meta.json"), _shard_read),
        Target("shard-bin", "train.bin of a token shard folder: load both splits, check ids",
               lambda f: _shard_seed(f, "train.bin"), _shard_read),
        Target("prepared-manifest", "manifest.json of a prepared data folder", lambda f: _shard_seed(f, "manifest.json"),
               _manifest_read),
        Target("documents-text", "a .txt input to data preparation", _text("doc.txt", TEXT), _documents_read),
        Target("documents-jsonl", "a .jsonl input to data preparation",
               _records("docs.jsonl", [{"text": TEXT[:60]}, {"text": "second", "id": 2}]), _documents_read),
        Target("documents-parquet", "a .parquet input to data preparation",
               lambda f: _parquet_seed(f, [{"text": TEXT[:60]}, {"text": "second"}], "docs.parquet"), _documents_read),
        Target("chat-jsonl", "instruction data (.jsonl): read, render with the chat format",
               _records("chat.jsonl", CHATS), _chat_read),
        Target("chat-parquet", "instruction data (.parquet): read, render with the chat format",
               lambda f: _parquet_seed(f, [{"prompt": "Name a colour.", "completion": "Blue."},
                                           {"prompt": "2 + 3?", "completion": "5"}], "chat.parquet"), _chat_read),
        Target("preferences", "preference pairs (.jsonl)", _records("prefs.jsonl", [
            {"prompt": "2 + 3?", "chosen": "5", "rejected": "6"},
            {"chosen": [*MESSAGES[:2], {"role": "assistant", "content": "5"}],
             "rejected": [*MESSAGES[:2], {"role": "assistant", "content": "four"}]}]), _preferences_read),
        Target("task-jsonl", "an evaluation task file (.jsonl)", _records("task.jsonl", [
            {"question": "Capital of France?", "choices": ["Paris", "Rome"], "answer": 0, "group": "eu"},
            {"question": "2 + 3?", "choices": ["4", "5"], "answer": 1}]), _task_read),
        Target("task-yaml", "an evaluation task file (.yaml)", _text("task.yaml", TASK_YAML), _task_read),
        Target("questions", "RAG evaluation questions (.jsonl)", _records("questions.jsonl", [
            {"question": "What is the capital of France?", "sources": ["doc.md"], "answer": "Paris"},
            {"question": "Who jumps?", "sources": ["doc.md#1"], "answer": ["fox", "the fox"]}]), _questions_read),
        Target("ratings-jsonl", "items for human rating (.jsonl): import, report", _records("items.jsonl", [
            {"prompt": "2 + 3?", "answer_a": "5", "answer_b": "6", "model_a": "x", "model_b": "y"},
            {"prompt": "Capital of France?", "answer": "Paris"}]), _ratings_read),
        Target("rating-store", "the human-ratings database (SQLite): open, report, next item", _rating_store_seed,
               _rating_store_read),
        Target("leaderboard", "the evaluation leaderboard database (SQLite): tables and page", _leaderboard_seed,
               _leaderboard_read),
        Target("knowledge-base", "kb.sqlite of a RAG knowledge base: open, BM25 and vector search",
               lambda f: _knowledge_seed(f, "kb.sqlite"), _knowledge_read),
        Target("knowledge-vectors", "vectors.npy of a RAG knowledge base: open, search",
               lambda f: _knowledge_seed(f, "vectors.npy"), _knowledge_read),
        Target("knowledge-ann", "the HNSW graph of a RAG knowledge base: open, search",
               lambda f: _knowledge_seed(f, "vectors.hnsw"), _knowledge_read),
        Target("knowledge-bm25-vocab", "the BM25 index's vocabulary (bm25s JSON): open, BM25 search",
               lambda f: _knowledge_seed(f, "bm25/vocab.index.json"), _knowledge_read),
        Target("knowledge-bm25-scores", "the BM25 index's scores (bm25s .npy): open, BM25 search",
               lambda f: _knowledge_seed(f, "bm25/data.csc.index.npy"), _knowledge_read),
        Target("generate-input", "prompts for lmforge generate --input (.jsonl): checked, then generated",
               _prompts_seed, _generate_read),
        Target("calibration", "a calibration file for lmforge quantize --calibrate (.jsonl): token windows",
               _records("calib.jsonl", [{"text": TEXT}, {"text": "Paris is the capital of France."}]),
               _calibration_read),
        Target("metrics-jsonl", "metrics.jsonl of a training run: read, cut back for --resume",
               _records("metrics.jsonl", [{"kind": "train", "step": s, "loss": 3.0 / s, "lr": 1e-3} for s in (1, 2, 3, 4)]
                        + [{"kind": "eval", "step": 4, "val_loss": 0.9}]), _metrics_read),
        Target("agent-trace", "an agent trace (.jsonl): lmforge agent --resume, to the answer", _trace_seed,
               _trace_read),
        Target("rating-prompts", "prompts for lmforge eval human-items (.jsonl)",
               _records("prompts.jsonl", [{"prompt": "Name a capital."}, {"prompt": "数字 12345?"}]), _prompts_read),
        Target("rag-html", "an HTML page to index (lmforge rag index): read, cleaned, chunked",
               _text("page.html", HTML), _rag_documents_read),
        Target("rag-pdf", "a PDF to index (lmforge rag index): read (pypdf), cleaned, chunked", _pdf_seed,
               _rag_documents_read),
        Target("rag-markdown", "a Markdown file to index (lmforge rag index): read, cleaned, chunked",
               _text("notes.md", "# Foxes\n\n" + TEXT), _rag_documents_read),
        *[Target(f"http-{name}", f"POST {path} bodies (the server answers < 500 and keeps serving)",
                 _http_seed(name), _http_read, names_file=False) for name, path in ENDPOINTS.items()],
    ]


def by_name(names: list[str] | None) -> list[Target]:
    """The targets named (all for None); InputError for an unknown name."""
    return pick(targets(), names, "fuzz target")
