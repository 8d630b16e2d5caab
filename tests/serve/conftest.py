"""A live `lmforge serve` for the tests: a tiny random-weight model behind a real uvicorn server.

The model has an lmforge BPE tokenizer and a 2048-token context, so answers can be made long
(max_tokens) for streaming and stop tests. Each server runs in a thread on a free loopback port.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from lmforge.api import LanguageModel
from lmforge.model import DecoderLM, preset
from lmforge.runtime import Runtime
from lmforge.serve.app import create_app
from lmforge.serve.served_model import ServedModel
from lmforge.tokenizer import SPECIAL_IDS, train_tokenizer

MODEL = "tiny"
TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
        '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}} [1, 2, 3] true false null. ') * 30


@pytest.fixture(scope="session")
def tiny_lm() -> LanguageModel:
    tokenizer = train_tokenizer([TEXT], 400, progress=False)
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=2048, tie_embeddings=False)).eval()
    with torch.no_grad():  # its replies are text: special tokens (left out of reply text) get logit 0, never the top
        model.lm_head.weight[list(SPECIAL_IDS.values())] = 0.0
    return LanguageModel(model, tokenizer, Runtime.resolve("cpu", "fp32"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(models: dict[str, ServedModel], **options) -> Iterator[str]:
    """Serve ``models`` on a free loopback port in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(models, **options), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="session")
def served(tiny_lm) -> ServedModel:
    return ServedModel(MODEL, tiny_lm, max_batch_size=4, context=2048)


@pytest.fixture(scope="session")
def live_server(served) -> Iterator[str]:
    with running_server({MODEL: served}) as url:
        yield url


@pytest.fixture(scope="session")
def start_server():
    """``start_server(models, **create_app options)``: a context manager yielding another server's URL."""
    return running_server


@pytest.fixture
def port() -> int:
    """A free loopback port (for a server the test starts as a subprocess)."""
    return free_port()
