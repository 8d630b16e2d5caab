"""The stage views of lmforge.inspector.stages on tiny models: LoRA, quantization, reward and DPO, RAG."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from lmforge.data.preferences import Preference
from lmforge.errors import InputError
from lmforge.inspector import (
    load_lora,
    lora_view,
    policy_ratio_view,
    quant_view,
    rag_view,
    reward_view,
)
from lmforge.model import DecoderLM, preset
from lmforge.model.heads import last_token_scores, with_head
from lmforge.peft.lora import LoraConfig, apply_lora, lora_layers, save_adapter
from lmforge.quant.integer import (
    QUANT_FILE,
    QuantSpec,
    dequantize,
    quantizable_layers,
    quantize_model,
    spec_json,
)

PROMPT = "What is the capital of France?"
REPLY = "Paris is the capital of France."


def randomise_adapters(model, seed: int = 1):
    torch.manual_seed(seed)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.05)


def json_ready(view) -> dict:
    data = view.to_dict()
    json.dumps(data, allow_nan=False)  # lists, rounded floats, no NaN or infinity
    return data


def test_lora_view_measures_the_update_b_a(tmp_path):
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=120)).eval()
    with pytest.raises(InputError, match="no LoRA adapters"):
        lora_view(model)
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets=["q_proj", "down_proj"]))
    fresh = lora_view(model).layers  # B = 0: no update yet
    assert all(layer.delta_norm == 0 and layer.effective_rank == 0 for layer in fresh)
    randomise_adapters(model)
    view = lora_view(model)
    assert [layer.name for layer in view.layers] == list(lora_layers(model)) and len(view.layers) == 4
    for entry in view.layers:
        layer = model.get_submodule(entry.name)
        by_hand = 2.0 * layer.lora_B.detach() @ layer.lora_A.detach()  # alpha / r = 8 / 4
        singular = torch.linalg.svdvals(by_hand)
        assert (entry.rank, entry.alpha, entry.scale) == (4, 8.0, 2.0)
        assert entry.delta_norm == pytest.approx(float(torch.linalg.norm(by_hand)), rel=1e-5)
        assert entry.weight_norm == pytest.approx(float(torch.linalg.norm(layer.base.weight)), rel=1e-5)
        assert entry.ratio == pytest.approx(entry.delta_norm / entry.weight_norm, rel=1e-6)
        assert int((singular > 1e-4 * singular[0]).sum()) <= 4  # rank r at most
        assert entry.delta_singular.shape == (4,) and entry.delta_tail < 1e-4 * entry.delta_singular[0]
        np.testing.assert_allclose(entry.delta_singular, singular[:4].numpy(), rtol=1e-4)
        assert float(np.sum(entry.delta_singular ** 2)) == pytest.approx(entry.delta_norm ** 2, rel=1e-4)
        weight_singular = torch.linalg.svdvals(layer.base.weight.detach())[:4]
        np.testing.assert_allclose(entry.weight_singular, weight_singular, rtol=1e-4)
        assert 1.0 <= entry.effective_rank <= 4.0
    assert view.adapter_parameters == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert json_ready(view)["layers"][0]["rank"] == 4
    with pytest.raises(InputError, match="adapted layers"):
        view.layer("blocks.0.attn.k_proj")

    # saved as `--method lora` saves it and put back on a fresh base: the same view
    save_adapter(model, tmp_path / "adapter")
    torch.manual_seed(0)
    loaded = load_lora(DecoderLM(preset("tiny", vocab_size=120)), tmp_path / "adapter")
    again = lora_view(loaded)
    np.testing.assert_allclose([layer.delta_norm for layer in again.layers],
                               [layer.delta_norm for layer in view.layers], rtol=1e-6)
    # merged into the base weight: W is still the weight without the update
    first = view.layers[0]
    model.get_submodule(first.name).merge()
    merged = lora_view(model).layers[0]
    assert merged.merged and merged.weight_norm == pytest.approx(first.weight_norm, rel=1e-5)


@pytest.fixture(scope="module")
def quantized_pair():
    torch.manual_seed(0)
    original = DecoderLM(preset("tiny", vocab_size=120)).eval()  # tied: the embedding table is quantized
    quantized = copy.deepcopy(original)
    spec = QuantSpec(8, "symmetric", "channel")
    errors = quantize_model(quantized, spec)
    return original, quantized, spec, errors


def test_quant_view_int8_per_channel(quantized_pair, tmp_path, tiny_lm):
    original, quantized, spec, errors = quantized_pair
    view = quant_view(original, quantized, bins=32)
    names = sorted(layer.name for layer in view.layers)
    assert names == sorted(quantizable_layers(original))  # the tied head once, as embed
    for entry in view.layers:
        layer = quantized.get_submodule(entry.name)
        error = dequantize(layer.codes(), layer.scale, layer.zero) - original.get_submodule(entry.name).weight
        assert entry.mse == pytest.approx(float(error.pow(2).mean()), rel=1e-6)
        assert entry.mse == pytest.approx(errors[entry.name]["mse"], rel=1e-6)  # lmforge quantize's report
        assert entry.max_error == pytest.approx(float(error.abs().max()), rel=1e-6)
        assert entry.max_error <= entry.max_scale / 2 + 1e-7 and entry.max_error_in_steps <= 0.5 + 1e-4
        assert (entry.bits, entry.scheme, entry.granularity) == (8, "symmetric", "channel")
    worst = max(view.layers, key=lambda layer: layer.mse)
    assert view.layer == worst.name
    count = original.get_submodule(worst.name).weight.numel()
    assert view.error_histogram.counts.sum() == count == view.original_histogram.counts.sum()
    assert view.dequantized_histogram.counts.sum() == count
    np.testing.assert_array_equal(view.original_histogram.edges, view.dequantized_histogram.edges)
    assert len(view.error_histogram.counts) == 32
    # the grid: row 0's 255 levels, and each of its weights snapped to one of them
    grid = view.grid
    assert grid.span == "row 0" and len(grid.levels) == 255 and grid.zero is None
    assert np.allclose(grid.dequantized, grid.codes * grid.scale)
    assert np.abs(grid.dequantized[:, None] - grid.levels[None]).min(1).max() < 1e-6
    assert np.abs(grid.weights - grid.dequantized).max() <= grid.scale / 2 + 1e-7
    assert json_ready(view)["grid"]["span"] == "row 0"
    chosen = quant_view(original, quantized, layer="blocks.1.attn.v_proj")
    assert chosen.layer == "blocks.1.attn.v_proj"
    with pytest.raises(InputError, match="quantized layers: embed"):
        quant_view(original, quantized, layer="blocks.9.attn.v_proj")
    with pytest.raises(InputError, match="no integer layers"):
        quant_view(original, original)
    # the checkpoint `lmforge quantize` writes, read from its folder
    from lmforge.checkpoint import model_state, write_checkpoint

    write_checkpoint(tmp_path / "int8", quantized.config, model_state(quantized), tiny_lm.tokenizer,
                     files={QUANT_FILE: spec_json(spec, quantizable_layers(original))})
    from_disk = quant_view(original, tmp_path / "int8")
    assert [layer.mse for layer in from_disk.layers] == pytest.approx([layer.mse for layer in view.layers])


def test_reward_view_scores_as_reward_model_training(tiny_lm):
    from lmforge.train.reward import PairRows

    torch.manual_seed(3)
    reward_model = with_head(tiny_lm.model, "score").eval()
    tokenizer = tiny_lm.tokenizer
    view = reward_view(reward_model, tokenizer, PROMPT, REPLY)
    rows = PairRows(tokenizer, [Preference([{"role": "user", "content": PROMPT}], REPLY, REPLY, "t")], 2048)
    length = int(rows.chosen_len[0])
    np.testing.assert_array_equal(view.ids, rows.chosen[0, :length])  # rendered as `lmforge rm` renders it
    with torch.no_grad():
        score = last_token_scores(reward_model, torch.from_numpy(view.ids)[None], torch.tensor([length]))
    assert view.score == pytest.approx(float(score[0]), abs=1e-6)
    assert view.values[-1] == pytest.approx(view.score, abs=1e-6)  # the reply's end of turn is the last token
    assert "".join(token.text for token in view.tokens[:-1]) == REPLY and len(view.values) == len(view.tokens)
    assert [token.position for token in view.tokens] == list(range(length - len(view.tokens), length))
    assert not view.truncated and np.isfinite(view.before_reply)
    assert json_ready(view)["tokens"][0]["text"] == view.tokens[0].text
    with pytest.raises(InputError, match="score"):
        reward_view(tiny_lm.model, tokenizer, PROMPT, REPLY)


def test_policy_ratio_view_is_dpos_log_ratio(tiny_lm):
    from lmforge.train.dpo import PreferenceRows, answer_logps

    tokenizer, reference = tiny_lm.tokenizer, tiny_lm.model
    same = policy_ratio_view(tiny_lm, tiny_lm, tokenizer, PROMPT, REPLY)
    assert np.all(same.log_ratios == 0) and same.log_ratio == 0 and same.implicit_reward == 0
    assert np.all(same.policy_logps < 0)

    policy = copy.deepcopy(reference)
    apply_lora(policy, LoraConfig(rank=4, alpha=8))
    randomise_adapters(policy, seed=2)
    view = policy_ratio_view(policy, reference, tokenizer, PROMPT, REPLY, beta=0.5)
    pair = Preference([{"role": "user", "content": PROMPT}], REPLY, REPLY, "t")
    rows = PreferenceRows(tokenizer, [pair], 2048)
    batch = rows.take([0], torch.device("cpu"))
    with torch.no_grad():
        policy_sum = float(answer_logps(policy, batch["chosen"], batch["chosen_mask"])[0][0])
        reference_sum = float(answer_logps(reference, batch["chosen"], batch["chosen_mask"])[0][0])
    assert view.policy_logp == pytest.approx(policy_sum, abs=1e-4)
    assert view.reference_logp == pytest.approx(reference_sum, abs=1e-4)
    assert view.log_ratio == pytest.approx(policy_sum - reference_sum, abs=1e-4) and view.log_ratio != 0
    assert view.implicit_reward == pytest.approx(0.5 * view.log_ratio)
    assert float(view.log_ratios.sum()) == pytest.approx(view.log_ratio, abs=1e-4)
    assert len(view.tokens) == int(batch["chosen_mask"].sum())  # the answer and its end of turn
    # no reference: the policy with its adapters off, as DPO with LoRA uses it
    own = policy_ratio_view(policy, None, tokenizer, PROMPT, REPLY, beta=0.5)
    np.testing.assert_allclose(own.reference_logps, view.reference_logps, atol=1e-5)
    json_ready(view)
    with pytest.raises(InputError, match="has none"):
        policy_ratio_view(reference, None, tokenizer, PROMPT, REPLY)


NOTES = """# Notes

Paris is the capital of France. The city lies on the Seine.

## Tea

A kettle boils water for tea. Green tea wants water below boiling.

## Serving

The server speaks the OpenAI API on port 8000.
"""


@pytest.fixture(scope="module")
def retriever(tmp_path_factory, tiny_lm):
    """A knowledge base of two small files, indexed by a random tiny encoder (the plumbing, not meaning)."""
    from lmforge.embed import Embedder
    from lmforge.rag import KnowledgeBase, Retriever, index_paths
    from lmforge.runtime import Runtime

    folder = tmp_path_factory.mktemp("rag")
    (folder / "docs").mkdir()
    (folder / "docs" / "notes.md").write_text(NOTES, encoding="utf-8")
    (folder / "docs" / "faq.jsonl").write_text(
        json.dumps({"text": "The capital of France is Paris.", "title": "geo"}) + "\n"
        + json.dumps({"text": "Rust has no garbage collector."}) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    encoder = DecoderLM(preset("bert-tiny", vocab_size=tiny_lm.tokenizer.vocab_size, head="hidden")).eval()
    embedder = Embedder(encoder, tiny_lm.tokenizer, Runtime.resolve("cpu", "fp32"))
    index_paths([folder / "docs"], folder / "kb", encoder=embedder, max_tokens=24, overlap=0, progress=False)
    return Retriever(KnowledgeBase(folder / "kb"), embedder)


def test_rag_view_scores_every_method_and_finds_each_chunk_in_the_prompt(retriever, tiny_lm):
    question = "What is the capital of France?"
    view = rag_view(retriever, question, k=3, tokenizer=tiny_lm.tokenizer)
    hits = retriever.search(question, k=3, method="hybrid")
    rows = [c.row for c in view.chunks]
    assert rows == [h.chunk.row for h in hits] and view.top["hybrid"] == rows
    assert [c.fused_rank for c in view.chunks] == [1, 2, 3]
    assert [c.fused_score for c in view.chunks] == pytest.approx([h.score for h in hits])
    bm25, dense = retriever.bm25_scores(question), retriever.dense_scores(question)
    for chunk in view.chunks:
        stored = retriever.kb.chunks[chunk.row]
        content = view.messages[chunk.message]["content"]
        assert content[chunk.prompt_start:chunk.prompt_end] == chunk.excerpt == stored.text
        assert content[:chunk.prompt_start].endswith(f"[{chunk.number}] {stored.title}\n")
        assert (chunk.start, chunk.end, chunk.source) == (stored.start, stored.end, stored.source)
        assert chunk.bm25_score == pytest.approx(bm25[chunk.row])
        assert chunk.dense_score == pytest.approx(dense[chunk.row])
        assert chunk.dense_rank == 1 + int(np.sum(dense > dense[chunk.row]))
        if chunk.bm25_rank is not None:  # fewer chunks than candidates: both methods rank every chunk
            rrf = 1 / (60 + chunk.bm25_rank) + 1 / (60 + chunk.dense_rank)
            assert chunk.fused_score == pytest.approx(rrf)
        covering = tiny_lm.tokenizer.decode(view.prompt_ids[chunk.token_start:chunk.token_end])
        assert chunk.excerpt in covering and len(covering) < len(chunk.excerpt) + 10
    # chunks picked by one method are scored by the others too
    dense_view = rag_view(retriever, question, k=len(retriever.kb), method="dense")
    assert [c.dense_rank for c in dense_view.chunks] == list(range(1, len(retriever.kb) + 1))
    assert any(c.bm25_score == 0 and c.bm25_rank is None for c in dense_view.chunks)
    assert all(c.token_start is None for c in dense_view.chunks) and dense_view.prompt_ids is None
    assert json_ready(view)["chunks"][0]["number"] == 1

    seen = []

    def generate(messages, max_new_tokens):
        seen.append(messages)
        return "Paris [1], see [7]."

    answered = rag_view(retriever, question, k=2, generate=generate, min_score=-1.0)
    assert (answered.answer, answered.cited, answered.relevant) == ("Paris [1], see [7].", [1], True)
    assert seen == [answered.messages]
    with pytest.raises(InputError, match="retrieval method"):
        rag_view(retriever, question, method="fuzzy")
