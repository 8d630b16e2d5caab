"""An imported model's tokenizer gives transformers' ids and renders its chat template identically."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from lmforge.errors import InputError
from lmforge.tokenizer.pretrained import PretrainedTokenizer

transformers = pytest.importorskip("transformers")

MIXED = "def f(x):\n    return x  # 注释 🙂\n\nThe  café, naïve — 日本語 and tabs\t\tend."
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2? 答"}]


def save_hf_tokenizer(folder, add_bos: bool):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([MIXED * 3, "hello world " * 20, "What is the capital of France?"], trainer=trainer)
    if add_bos:  # Llama's way: a post-processor puts <s> before every text
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("add_bos", [True, False])
def test_same_ids_specials_and_chat_text_as_transformers(tmp_path, add_bos):
    reference = save_hf_tokenizer(tmp_path, add_bos)
    ours = PretrainedTokenizer.from_dir(tmp_path)
    assert ours.encode(MIXED) == reference.encode(MIXED, add_special_tokens=False)
    assert ours.encode(MIXED, add_bos=True) == reference.encode(MIXED)  # framed as transformers frames it
    assert ours.decode(ours.encode(MIXED)) == MIXED
    assert (ours.bos_id is not None) == add_bos
    assert ours.eos_id == reference.eos_token_id and ours.vocab_size == len(reference)
    rendered = ours.apply_chat_template(MESSAGES)
    assert rendered == reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours.encode(rendered) == reference.encode(rendered, add_special_tokens=False)
    assert "</s>" in rendered and ours.eos_id in ours.encode(rendered)  # specials in the rendered text stay special


def test_save_and_reload_keeps_template_and_specials(tmp_path):
    save_hf_tokenizer(tmp_path / "a", add_bos=True)
    first = PretrainedTokenizer.from_dir(tmp_path / "a")
    first.save(tmp_path / "b")
    second = PretrainedTokenizer.from_dir(tmp_path / "b")
    assert second.apply_chat_template(MESSAGES) == first.apply_chat_template(MESSAGES)
    assert (second.bos_id, second.eos_id, second.encode(MIXED)) == (first.bos_id, first.eos_id, first.encode(MIXED))


def test_missing_files_and_templates_are_named(tmp_path):
    with pytest.raises(InputError, match="no tokenizer.json"):
        PretrainedTokenizer.from_dir(tmp_path)
    save_hf_tokenizer(tmp_path, add_bos=False)
    tokenizer = PretrainedTokenizer.from_dir(tmp_path)
    tokenizer.chat_template = None
    with pytest.raises(InputError, match="no chat template"):
        tokenizer.apply_chat_template(MESSAGES)
