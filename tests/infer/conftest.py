"""Small models and a byte tokenizer for the inference tests.

- ``make_model``: a tiny random DecoderLM. Untied and with a large init std, so that
  greedy decoding does not just repeat the last token and depends on positions.
- ``MarkovLM``: next-token log-probabilities depend only on the last token (a table),
  so beam search and stop handling have known answers.
- ``ScriptedLM``: greedy decoding spells out a fixed token script, whatever the prompt.
- ``ByteTokenizer``: one id per byte plus BOS/EOS, so tokens end mid-UTF-8 character.
- ``config_patches``: counts the torch config patches made inside it (a warm compiled step makes none).
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn

from lmforge.model import DecoderLM, KVCache, ModelConfig, preset


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; two threads on a busy 2-core machine run 5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_model(seed: int = 0, **overrides) -> DecoderLM:
    settings = dict(vocab_size=64, tie_embeddings=False, init_std=0.5)
    settings.update(overrides)
    torch.manual_seed(seed)
    return DecoderLM(preset("tiny", **settings)).eval()


@pytest.fixture
def config_patches():
    """``with config_patches() as patches:``: every ``patch`` of a torch config (Inductor's, Dynamo's, the
    compiler's) made inside it is counted in ``patches.call_count``, with its keywords in ``call_args_list``;
    the patches themselves still apply. A compiled step patches them only where it compiles
    (:meth:`lmforge.infer.compiled.CompiledDecodeStep._run`)."""
    from torch.utils._config_module import ConfigModule

    return lambda: mock.patch.object(ConfigModule, "patch", autospec=True, side_effect=ConfigModule.patch)


@pytest.fixture
def make_model():
    return build_model


class TableLM(nn.Module):
    """Base for the hand-made models: a DecoderLM-shaped config, one parameter, a cache contract."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.config: ModelConfig = preset("tiny", vocab_size=vocab_size)
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the engine a device and a dtype

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        start = cache.length if cache is not None else 0
        logits = self.logits(input_ids, start)  # (B, T, V)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return logits

    def logits(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        raise NotImplementedError


class MarkovLM(TableLM):
    """log p(next | ids) = table[last id]. table (V, V) of probabilities (rows sum to 1)."""

    def __init__(self, table: torch.Tensor):
        super().__init__(table.shape[0])
        self.register_buffer("log_table", table.clamp_min(1e-12).log())

    def logits(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        return self.log_table[input_ids]


class ScriptedLM(TableLM):
    """Greedy decoding after a prompt of ``prompt_len`` tokens yields ``script`` in order."""

    def __init__(self, script: list[int], prompt_len: int, vocab_size: int = 258):
        super().__init__(vocab_size)
        self.script, self.prompt_len = script, prompt_len
        self.calls = 0  # forward passes so far: shows when decoding stopped early

    def logits(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        self.calls += 1
        batch, seq_len = input_ids.shape
        out = torch.zeros(batch, seq_len, self.config.vocab_size)
        for t in range(seq_len):
            index = start + t + 1 - self.prompt_len  # the position this logit predicts, in the script
            if 0 <= index < len(self.script):
                out[:, t, self.script[index]] = 10.0
        return out


class ByteTokenizer:
    """ids 0-255 are bytes; 256 is BOS, 257 is EOS. Decoding replaces broken UTF-8 with U+FFFD."""

    bos_id, eos_id = 256, 257
    special_ids = (256, 257)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return ([self.bos_id] if add_bos else []) + list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@pytest.fixture
def byte_tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture
def markov_lm() -> type[MarkovLM]:
    return MarkovLM


@pytest.fixture
def scripted_lm() -> type[ScriptedLM]:
    return ScriptedLM
