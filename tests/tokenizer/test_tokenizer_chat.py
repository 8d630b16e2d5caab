"""The chat format: ids and loss mask, the same ids through Hugging Face's template, clear errors."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.errors import InputError
from lmforge.tokenizer import END_OF_TURN, SPECIAL_IDS, train_tokenizer
from lmforge.tokenizer.chat import end_of_turn_ids, render_chat
from lmforge.tokenizer.pretrained import PretrainedTokenizer

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2? <|assistant|> 你好"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6, of course 🙂"}]


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["What is 2+2? The answer is 4. And 3+3 is 6, of course. Be brief. 你好 🙂\n" * 30]
    return train_tokenizer(texts, 300)


def test_mask_is_true_exactly_on_assistant_turns(tokenizer):
    chat = render_chat(tokenizer, CHAT)
    assert len(chat.ids) == len(chat.mask) and chat.ids[0] == tokenizer.bos_id
    learned = [i for i, m in zip(chat.ids, chat.mask) if m]
    eot = SPECIAL_IDS[END_OF_TURN]
    assert learned == tokenizer.encode("4") + [eot] + tokenizer.encode("6, of course 🙂") + [eot]
    assert tokenizer.decode(chat.ids).count("<|end_of_turn|>") == 5
    # The user's text "<|assistant|>" is text, not the special token.
    assert chat.ids.count(SPECIAL_IDS["<|assistant|>"]) == 2
    prompt = render_chat(tokenizer, CHAT[:2], add_generation_prompt=True)
    assert prompt.ids[-1] == SPECIAL_IDS["<|assistant|>"] and not any(prompt.mask)
    assert end_of_turn_ids(tokenizer)[0] == eot


def test_hugging_face_renders_the_exported_template_to_the_same_ids(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmforge.interop.hf import save_tokenizer_hf

    save_tokenizer_hf(tokenizer, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    safe = [m for m in CHAT if "<|assistant|>" not in m["content"]]  # HF would read that text as the special
    ours = render_chat(tokenizer, safe, add_generation_prompt=True).ids
    theirs = hf.apply_chat_template(safe, tokenize=True, add_generation_prompt=True)
    theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
    assert list(theirs) == ours
    assert tokenizer.apply_chat_template(safe) == hf.apply_chat_template(safe, tokenize=False,
                                                                         add_generation_prompt=True)


def test_an_imported_template_masks_what_each_assistant_turn_adds(tmp_path):
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(["What is 2+2? 4 And 3+3? 6, of course"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = PretrainedTokenizer(hf, {"eos_token": "<|im_end|>"}, template)
    chat = render_chat(tok, CHAT)
    learned = tok.decode([i for i, m in zip(chat.ids, chat.mask) if m])
    assert learned == "4<|im_end|>\n6, of course 🙂<|im_end|>\n"
    assert end_of_turn_ids(tok) == [tok.eos_id]


def test_bad_conversations_are_named(tokenizer):
    with pytest.raises(InputError, match="non-empty list"):
        render_chat(tokenizer, [])
    with pytest.raises(InputError, match=r"messages\[1\]: unknown role 'robot'"):
        render_chat(tokenizer, [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}])
    with pytest.raises(InputError, match=r"messages\[0\]: expected"):
        render_chat(tokenizer, [{"role": "user"}])
