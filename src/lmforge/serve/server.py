"""``lmforge serve``: load the models, build the app, run it under uvicorn until SIGTERM or Ctrl-C.

On SIGTERM uvicorn stops accepting connections and gives in-flight responses
``graceful_seconds`` to finish; what is still streaming then is cancelled (its rows
are aborted), the engine threads stop, and the process exits with code 0.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import InputError
from lmforge.settings import field


@dataclass
class ServeConfig:
    """How the server listens and batches."""

    host: str = field("127.0.0.1", "address to listen on (loopback by default; 0.0.0.0 opens it to the network)")
    port: int = field(8000, "TCP port")
    api_key: str | None = field(None, "require 'Authorization: Bearer KEY' on /v1/ routes")
    max_batch_size: int = field(8, "requests decoded together per model (KV cache slots)")
    max_queue: int = field(64, "requests waiting for a slot before new ones get 429")
    context: int | None = field(None, "positions per slot (default: the model's max_seq_len, at most 4096)")
    device: str = field("auto", "auto, cpu, cuda, mps")
    dtype: str = field("auto", "auto, bf16, fp32")
    weights: str = field("fp32", "fp32, or fp16/bf16: 16-bit weights with fp32 arithmetic")
    compile: bool = field(False, "compile the decode step for every batch bucket at startup (SmolLM2 on 2 cores: "
                                 "about 110 s per bucket, then ~1.5x the eager tokens/s)")
    compile_prefill: bool = field(False, "with --compile: also compile the pass that admits new prompts beside "
                                         "the running ones (one more graph, 1-2 minutes on 2 CPU cores; each "
                                         "admission about a third cheaper)")
    graceful_seconds: float = field(10.0, "on SIGTERM, how long in-flight responses may take to finish")
    ratings: str | None = field(None, "SQLite file for human ratings: turns on the rating page /static/rate.html "
                                      "and /v1/ratings (see `lmforge eval human-report`)")
    rating_items: str | None = field(None, "JSONL of answers to rate (prompt, answer_a, answer_b, model_a, "
                                           "model_b), added to --ratings at startup")
    embedder: str | None = field(None, "an encoder for /v1/embeddings (e.g. all-minilm-l6-v2): requests naming it, "
                                       "or naming no chat model, get its sentence embeddings")
    kb: str | None = field(None, "a knowledge base (lmforge rag index) answered from at POST /v1/rag/ask, with "
                                 "sources; its own encoder embeds the questions unless --embedder is given")


def parse_model_specs(default: str | None, specs: list[str] | None) -> dict[str, str]:
    """``name=path`` pairs (``--model``, repeatable) and/or one positional model -> {name: path}."""
    out: dict[str, str] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--model takes NAME=PATH, got {spec!r}")
        if name in out:
            raise InputError(f"model name {name!r} given twice")
        out[name] = path
    if default is not None or not out:
        from lmforge.interop.packaged import DEFAULT_CHAT_MODEL

        path = default or DEFAULT_CHAT_MODEL
        out = {_short_name(path): path, **out}
    return out


def _short_name(path: str) -> str:
    p = Path(path)
    return p.stem if p.suffix == ".gguf" else (p.name or path)


def build_models(paths: dict[str, str], config: ServeConfig, log=print, speculative: dict | None = None) -> dict:
    """Load and wrap each model; ``speculative``: :func:`lmforge.load`'s drafter options (``draft``,
    ``prompt_lookup``, ``draft_layers``, ``draft_tokens``) for every model."""
    import time

    from lmforge.api import load
    from lmforge.serve.served_model import ServedModel

    models = {}
    for name, path in paths.items():
        start = time.perf_counter()
        # Compiled without autotuning: each batch bucket compiles in half the time.
        lm = load(path, device=config.device, dtype=config.dtype, weights=config.weights, compile=config.compile,
                  compile_prefill=config.compile_prefill, autotune=False, **(speculative or {}))
        context = config.context or min(lm.model.config.max_seq_len, 4096)
        served = ServedModel(name, lm, config.max_batch_size, context)
        log(f"[serve] {name}: {path} ({lm.model.num_parameters() / 1e6:.1f}M parameters, context {served.context}, "
            f"{config.max_batch_size} slots, KV cache {served.engine.cache.bytes_per_slot() * config.max_batch_size / 2**20:.0f} MiB) "
            f"in {time.perf_counter() - start:.1f} s")
        if config.compile:
            log(f"[serve] {name}: compiling the decode step for batch sizes {served.engine.decode_buckets}"
                f"{' and the prefill pass' if config.compile_prefill else ''} ...")
            seconds = served.engine.warm_up(lm.draft_width)
            log(f"[serve] {name}: compiled in {seconds:.0f} s")
        models[name] = served
    return models


def run_server(paths: dict[str, str], config: ServeConfig, speculative: dict | None = None) -> None:
    """Serve until SIGTERM or Ctrl-C: HTTP in a thread, the engines on this (the loading) thread."""
    import signal
    import threading

    import uvicorn

    from lmforge.serve.app import create_app
    from lmforge.serve.worker import drive

    if config.max_batch_size < 1:
        raise InputError(f"--max-batch-size must be at least 1, got {config.max_batch_size}")
    models = build_models(paths, config, speculative=speculative)
    ratings = None
    if config.ratings:
        from lmforge.eval.human import RatingStore

        ratings = RatingStore(config.ratings)
        if config.rating_items:
            added = ratings.import_jsonl(config.rating_items)  # a bad file: an InputError naming it
            print(f"[serve] added {added} new items to rate", flush=True)
    elif config.rating_items:
        raise InputError("--rating-items needs --ratings FILE (where the ratings are stored)")
    embedder = knowledge_base = None
    if config.embedder:
        from lmforge.embed import load as load_embedder

        embedder = load_embedder(config.embedder, device=config.device)
        print(f"[serve] embeddings: {config.embedder} ({embedder.dim} dimensions)", flush=True)
    if config.kb:
        from lmforge.rag import KnowledgeBase

        knowledge_base = KnowledgeBase(config.kb)
        print(f"[serve] knowledge base: {config.kb} ({len(knowledge_base)} chunks) at POST /v1/rag/ask", flush=True)
    app = create_app(models, api_key=config.api_key, max_queue=config.max_queue, engine_threads=False,
                     ratings=ratings, embedder=embedder, knowledge_base=knowledge_base)
    print(f"[serve] http://{config.host}:{config.port}/  (web UI; API at /v1, metrics at /metrics)", flush=True)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="info",
                                           timeout_graceful_shutdown=config.graceful_seconds))

    def stop(sig, frame) -> None:
        """SIGTERM/Ctrl-C: stop taking connections; half-way through the grace period, end what is still
        generating, so that every stream closes with its final chunk and [DONE] rather than being cut."""
        if not server.should_exit:
            timer = threading.Timer(config.graceful_seconds * 0.5,
                                    lambda: [m.worker.abort_all() for m in models.values()])
            timer.daemon = True
            timer.start()
        server.handle_exit(sig, frame)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    http = threading.Thread(target=server.run, name="lmforge-http")
    http.start()
    workers = [m.worker for m in models.values()]
    watcher = threading.Thread(target=lambda: (http.join(), [w.stop() for w in workers]), daemon=True)
    watcher.start()  # the HTTP server ended (shutdown, or it could not bind): stop driving the engines
    drive(workers)
    http.join()


@contextlib.contextmanager
def background_server(models: dict, host: str = "127.0.0.1", port: int = 0, **options) -> Iterator[str]:
    """Serve ``models`` ({name: ServedModel}) from a thread of this process while the ``with`` block
    runs; yields the base URL. ``port`` 0 takes a free one. ``options`` go to
    :func:`lmforge.serve.app.create_app`. For tests, notebooks and benchmarks that drive the API."""
    import socket
    import threading
    import time

    import uvicorn

    from lmforge.serve.app import create_app

    if port == 0:
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(models, **options), host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the server on {host}:{port} did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
