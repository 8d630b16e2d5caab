"""The encoder-only form (BERT): bidirectional attention, post-norm, segment embeddings, MLM/NSP heads,
and transformers' BERT classes read and written with the same outputs."""

from __future__ import annotations

import pytest
import torch

from lmforge.checkpoint import load_model
from lmforge.errors import InputError
from lmforge.interop.convert import export_checkpoint
from lmforge.model import DecoderLM, ModelConfig, preset
from lmforge.model.transformer import padding_mask

transformers = pytest.importorskip("transformers")


def bert_config(**extra):
    return transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=37, max_position_embeddings=64, **extra)


def batch():
    torch.manual_seed(1)
    ids, types = torch.randint(0, 99, (2, 9)), torch.randint(0, 2, (2, 9))
    attention = torch.ones(2, 9, dtype=torch.long)
    attention[1, 6:] = 0  # the second row is padded
    return ids, types, attention


@pytest.mark.parametrize("name", ["BertModel", "BertForMaskedLM", "BertForPreTraining"])
def test_transformers_bert_reads_with_the_same_outputs(tmp_path, name):
    torch.manual_seed(0)
    hf = getattr(transformers, name)(bert_config()).eval()
    with torch.no_grad():  # large random weights: every part matters to the outputs
        for parameter in hf.parameters():
            parameter.normal_(0, 0.2)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ids, types, attention = batch()
    real = attention.bool()
    with torch.no_grad():
        theirs = hf(input_ids=ids, token_type_ids=types, attention_mask=attention)
        hidden = model(ids, token_types=types, mask=padding_mask(attention), return_hidden=True)
        ours = model(ids, token_types=types, mask=padding_mask(attention))
    assert model.config.head == {"BertModel": "hidden", "BertForMaskedLM": "mlm", "BertForPreTraining": "mlm+nsp"}[name]
    if name == "BertModel":
        torch.testing.assert_close(ours[real], theirs.last_hidden_state[real], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.pooled(hidden), theirs.pooler_output, atol=1e-5, rtol=1e-5)
    else:
        logits = theirs.logits if name == "BertForMaskedLM" else theirs.prediction_logits
        torch.testing.assert_close(ours[real], logits[real], atol=1e-5, rtol=1e-5)
    if name == "BertForPreTraining":
        torch.testing.assert_close(model.next_sentence_logits(hidden), theirs.seq_relationship_logits,
                                   atol=1e-5, rtol=1e-5)


def test_an_lmforge_encoder_exports_to_transformers_with_the_same_outputs(tmp_path):
    from lmforge.checkpoint import model_state, write_checkpoint

    torch.manual_seed(0)
    model = DecoderLM(preset("bert-tiny", vocab_size=120, head="mlm+nsp")).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    write_checkpoint(tmp_path / "ours", model.config, model_state(model))
    export_checkpoint(tmp_path / "ours", tmp_path / "hf")
    hf = transformers.BertForPreTraining.from_pretrained(tmp_path / "hf").eval()
    ids, types, attention = torch.randint(0, 120, (2, 9)), torch.randint(0, 2, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    with torch.no_grad():
        theirs = hf(input_ids=ids, token_type_ids=types, attention_mask=attention)
        hidden = model(ids, token_types=types, return_hidden=True)
        torch.testing.assert_close(model.logits(hidden), theirs.prediction_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.next_sentence_logits(hidden), theirs.seq_relationship_logits,
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="GGUF"):
        export_checkpoint(tmp_path / "ours", tmp_path / "x.gguf", format="gguf")


def test_an_encoder_sees_both_sides_and_a_decoder_only_the_left():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 50  # only the last token differs
    for causal, first_moves in ((False, True), (True, False)):
        overrides = {} if not causal else {"causal": True, "head": "lm"}
        model = DecoderLM(preset("bert-tiny", vocab_size=50, **overrides)).eval()
        with torch.no_grad():
            a, b = model(ids, return_hidden=True), model(changed, return_hidden=True)
        assert (not torch.allclose(a[0, 0], b[0, 0])) == first_moves


def test_padding_changes_no_real_token_of_an_encoder():
    torch.manual_seed(0)
    model = DecoderLM(preset("bert-tiny", vocab_size=50, head="hidden")).eval()
    ids = torch.randint(1, 50, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    attention = torch.tensor([[1] * 6 + [0] * 3])
    with torch.no_grad():
        alone = model(ids)
        with_padding = model(padded, mask=padding_mask(attention))
    torch.testing.assert_close(with_padding[:, :6], alone, atol=1e-5, rtol=1e-5)


def test_encoder_configs_are_checked():
    with pytest.raises(ValueError, match="causal=false"):
        ModelConfig(head="mlm")
    with pytest.raises(ValueError, match="norm_position"):
        ModelConfig(norm_position="middle")
    model = DecoderLM(preset("bert-tiny", vocab_size=50))
    with pytest.raises(ValueError, match="mlm\\+nsp"):
        model.next_sentence_logits(torch.zeros(1, 2, 64))
    with pytest.raises(ValueError, match="segment embeddings"):
        DecoderLM(preset("tiny", vocab_size=50))(torch.zeros(1, 2, dtype=torch.long), token_types=torch.zeros(1, 2))


def test_an_encoder_does_not_generate(tmp_path):
    from lmforge.api import load
    from lmforge.checkpoint import model_state, write_checkpoint
    from lmforge.infer.engine import Engine

    model = DecoderLM(preset("bert-tiny", vocab_size=50))
    with pytest.raises(ValueError, match="encoder"):
        Engine(model)
    write_checkpoint(tmp_path, model.config, model_state(model))
    with pytest.raises(InputError, match="encoder"):
        load(tmp_path, device="cpu")
