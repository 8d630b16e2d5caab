"""SFT: records of every shape, packing without cross-talk, loss on answers only, through the one loop."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lmforge.data.chat_records import iter_chat_records, record_to_messages
from lmforge.data.sources import ReadErrors
from lmforge.errors import InputError
from lmforge.infer import SamplingConfig, generate
from lmforge.infer.seq2seq import generate_seq2seq
from lmforge.model import DecoderLM, build_model, preset
from lmforge.tokenizer import SPECIAL_IDS, train_tokenizer
from lmforge.tokenizer.chat import ChatTokens, render_chat
from lmforge.train import TrainConfig, fit
from lmforge.train.sft import IGNORE, Seq2SeqSFTStage, SFTStage, pack_examples, split_examples

FACTS = [(f"What is {a} plus {b}?", str(a + b)) for a, b in [(2, 3), (4, 4), (7, 1), (5, 9), (8, 6), (3, 3)]]


@pytest.fixture(scope="module")
def tokenizer():
    text = " ".join(f"{q} {a}" for q, a in FACTS) + " 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15"
    return train_tokenizer([text * 20], 300)


def conversations():
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in FACTS]


def test_record_shapes_become_the_same_conversation():
    want = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]
    assert record_to_messages({"messages": want}, "r") == want
    assert record_to_messages({"instruction": "Add 2 and 3.", "output": "5"}, "r") == want
    assert record_to_messages({"prompt": "Add 2 and 3.", "completion": "5"}, "r") == want
    alpaca = record_to_messages({"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be exact."}, "r")
    assert alpaca[0] == {"role": "system", "content": "Be exact."} and alpaca[1]["content"] == "Add\n\n2 and 3"


def test_bad_records_name_file_and_line_or_are_counted(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n{broken\n"
                    + json.dumps({"question": "?"}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n")
    with pytest.raises(InputError, match=r"sft.jsonl:2: invalid JSON"):
        list(iter_chat_records(path))
    errors = ReadErrors(skip=True)
    assert len(list(iter_chat_records(path, errors))) == 1
    assert errors.counts == {"invalid_json": 1, "invalid_record": 2}
    assert any("sft.jsonl:3: no known fields (found question" in e for e in errors.examples)
    assert any("sft.jsonl:4: the conversation has no assistant turn" in e for e in errors.examples)


def test_packing_keeps_examples_apart_and_targets_only_answers():
    examples = [ChatTokens([1, 10, 11, 12], [False, False, True, True]),
                ChatTokens([1, 20, 21], [False, False, True]),
                ChatTokens([1, 30, 31, 32, 33, 34, 35, 36, 37, 38], [False] * 5 + [True] * 5)]
    rows = pack_examples(examples, seq_len=6, pad_id=2)
    assert rows.inputs.tolist()[0] == [1, 10, 11, 1, 20, 2]
    assert rows.targets.tolist()[0] == [IGNORE, 11, 12, IGNORE, 21, IGNORE]  # never 12 -> 1 across examples
    assert rows.segments.tolist()[0] == [0, 0, 0, 1, 1, -1]
    assert rows.inputs.tolist()[1] == [1, 30, 31, 32, 33, 34] and rows.truncated == 1


def test_packed_loss_equals_each_example_alone(tokenizer):
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=tokenizer.vocab_size)).eval()
    examples = [render_chat(tokenizer, c) for c in conversations()]
    rows = pack_examples(examples, seq_len=64, pad_id=SPECIAL_IDS["<|pad|>"])
    assert len(rows) < len(examples)  # several examples per row
    batch = {k: torch.from_numpy(getattr(rows, k)) for k in ("inputs", "targets", "segments")}
    packed = SFTStage.loss(model, batch)
    total = count = 0
    for example in examples:  # each alone, unpacked, loss summed over its answer tokens
        ids = torch.tensor([example.ids])
        mask = torch.tensor(example.mask[1:])
        losses = F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:], reduction="none")
        total, count = total + losses[mask].sum(), count + int(mask.sum())
    torch.testing.assert_close(packed, total / count, rtol=1e-5, atol=1e-6)


def test_sft_through_the_loop_learns_the_answers(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=64))
    examples = [render_chat(tokenizer, c) for c in conversations()]
    rows = pack_examples(examples, seq_len=64, pad_id=SPECIAL_IDS["<|pad|>"])
    stage = SFTStage(rows, seed=0, val=rows)
    before = stage.evaluate(model, _runtime(), 10_000, 4)["val_loss"]
    config = TrainConfig(out_dir=str(tmp_path / "sft"), batch_size=2, seq_len=64, max_steps=120, lr=3e-3,
                         warmup_steps=5, eval_every=120, eval_tokens=10_000, save_every=1000, log_every=20,
                         device="cpu", dtype="fp32", progress=False)
    result = fit(model, stage, config, tokenizer=tokenizer)
    assert result.final["val_loss"] < 0.2 * before
    prompt = render_chat(tokenizer, conversations()[3][:1], add_generation_prompt=True).ids
    answer = generate(model, [prompt], SamplingConfig(max_new_tokens=4, temperature=0,
                                                     stop_token_ids=[SPECIAL_IDS["<|end_of_turn|>"]]))[0]
    assert tokenizer.decode(answer) == FACTS[3][1]


def test_batches_depend_on_seed_and_step_only(tokenizer):
    rows = pack_examples([render_chat(tokenizer, c) for c in conversations()] * 5, 32, 2)
    a, b = SFTStage(rows, seed=3), SFTStage(rows, seed=3)
    assert a.rows_of(7, 2, 4, 8).tolist() == b.rows_of(7, 2, 4, 8).tolist()
    epoch = a.rows_of(0, 0, len(rows), len(rows))
    assert sorted(epoch.tolist()) == list(range(len(rows)))  # an epoch visits every row once


def _runtime():
    from lmforge.runtime import Runtime

    return Runtime.resolve("cpu", "fp32")


def test_a_hugging_face_dataset_streams_conversations(monkeypatch):
    import sys
    import types

    def load_dataset(name, config, split, streaming):
        assert (name, config, split, streaming) == ("org/chat", None, "train", True)
        return iter([{"prompt": "Hi?", "completion": "Hello."}, {"instruction": "Add 1 and 1.", "output": "2"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    conversations = list(iter_chat_records("hf:org/chat:train"))
    assert [c[-1]["content"] for c in conversations] == ["Hello.", "2"]


def test_an_encoder_decoder_reads_the_prompt_and_learns_the_answer(tokenizer, tmp_path):
    """The split: source up to the assistant's first token, target from there; padding changes no loss; and
    through the loop the decoder learns to write each answer from the encoded question."""
    split = split_examples([ChatTokens([1, 10, 11, 12, 13, 14], [False] * 4 + [True] * 2),
                            ChatTokens([1, 20, 21, 22, 23, 24, 25, 26], [False, False, True, True, False, True,
                                                                        True, True])], seq_len=5, pad_id=2)
    assert split.sources.tolist() == [[1, 10, 11, 12], [1, 20, 2, 2]]
    assert split.source_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert split.decoder_ids.tolist() == [[13, 14, 2, 2, 2], [21, 22, 23, 24, 25]]  # cut to seq_len
    assert split.targets.tolist() == [[13, 14, IGNORE, IGNORE, IGNORE], [21, 22, IGNORE, 24, 25]]
    assert split.truncated == 1
    torch.manual_seed(0)
    model = build_model(preset("t5-tiny", vocab_size=tokenizer.vocab_size, max_seq_len=64))
    rows = split_examples([render_chat(tokenizer, c) for c in conversations()], 64, SPECIAL_IDS["<|pad|>"])
    batch = {name: torch.from_numpy(getattr(rows, name)) for name in Seq2SeqSFTStage.fields}
    together = Seq2SeqSFTStage.loss(model, batch) * (rows.targets != IGNORE).sum()
    alone = sum(Seq2SeqSFTStage.loss(model, {name: value[i:i + 1] for name, value in batch.items()})
                * (rows.targets[i] != IGNORE).sum() for i in range(len(rows)))
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)  # padded rows: the same summed loss
    stage = Seq2SeqSFTStage(rows, seed=0, val=rows)
    before = stage.evaluate(model, _runtime(), 10_000, 4)["val_loss"]
    config = TrainConfig(out_dir=str(tmp_path / "sft"), batch_size=3, seq_len=64, max_steps=100, lr=3e-3,
                         warmup_steps=5, eval_every=100, eval_tokens=10_000, save_every=1000, log_every=20,
                         device="cpu", dtype="fp32", progress=False)
    result = fit(model, stage, config, tokenizer=tokenizer)
    assert result.final["val_loss"] < 0.2 * before
    question = render_chat(tokenizer, conversations()[3][:1], add_generation_prompt=True).ids
    answer = generate_seq2seq(model, [question], SamplingConfig(max_new_tokens=4, temperature=0,
                                                                stop_token_ids=[SPECIAL_IDS["<|end_of_turn|>"]]))[0]
    assert tokenizer.decode(answer) == FACTS[3][1]
