"""``lmforge serve``: load the models, build the app, run it under uvicorn until SIGTERM or Ctrl-C.

On SIGTERM uvicorn stops accepting connections and gives in-flight responses
``graceful_seconds`` to finish; what is still streaming then is cancelled (its rows
are aborted), the engine threads stop, and the process exits with code 0.
"""

from __future__ import annotations

import logging
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
    compile: bool = field(False, "compile the decode step for every batch bucket at startup (faster, slow start)")
    graceful_seconds: float = field(10.0, "on SIGTERM, how long in-flight responses may take to finish")


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


def build_models(paths: dict[str, str], config: ServeConfig, log=print) -> dict:
    import time

    from lmforge.api import load
    from lmforge.serve.served_model import ServedModel

    models = {}
    for name, path in paths.items():
        start = time.perf_counter()
        lm = load(path, device=config.device, dtype=config.dtype, weights=config.weights, compile=config.compile)
        context = config.context or min(lm.model.config.max_seq_len, 4096)
        served = ServedModel(name, lm, config.max_batch_size, context)
        log(f"[serve] {name}: {path} ({lm.model.num_parameters() / 1e6:.1f}M parameters, context {served.context}, "
            f"{config.max_batch_size} slots, KV cache {served.engine.cache.bytes_per_slot() * config.max_batch_size / 2**20:.0f} MiB) "
            f"in {time.perf_counter() - start:.1f} s")
        if config.compile:
            log(f"[serve] {name}: compiling the decode step for batch sizes {served.engine.buckets} ...")
            seconds = served.engine.warm_up()
            log(f"[serve] {name}: compiled in {seconds:.0f} s")
        models[name] = served
    return models


def run_server(paths: dict[str, str], config: ServeConfig) -> None:
    import uvicorn

    from lmforge.serve.app import create_app

    if config.max_batch_size < 1:
        raise InputError(f"--max-batch-size must be at least 1, got {config.max_batch_size}")
    models = build_models(paths, config)
    app = create_app(models, api_key=config.api_key, max_queue=config.max_queue)
    print(f"[serve] http://{config.host}:{config.port}/  (web UI; API at /v1, metrics at /metrics)", flush=True)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    config_ = uvicorn.Config(app, host=config.host, port=config.port, log_level="info",
                             timeout_graceful_shutdown=config.graceful_seconds)
    _server_class()(config_, lambda: _end_in_flight(models, config.graceful_seconds)).run()


def _server_class():
    """uvicorn's server, changed in two ways for SIGTERM/Ctrl-C: it ends in-flight generations within its
    grace period, so that every stream closes with a final chunk and ``[DONE]`` rather than being cut;
    and it exits with code 0 afterwards (uvicorn re-raises the signal, which kills the process)."""
    import signal
    from contextlib import contextmanager

    import uvicorn

    class Server(uvicorn.Server):
        def __init__(self, config: uvicorn.Config, on_exit):
            super().__init__(config)
            self.on_exit = on_exit

        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                self.on_exit()
            super().handle_exit(sig, frame)

        @contextmanager
        def capture_signals(self):
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


def _end_in_flight(models: dict, grace: float) -> None:
    """Half-way through the grace period, abort whatever is still generating."""
    import threading

    def abort() -> None:
        for model in models.values():
            model.worker.abort_all()
    timer = threading.Timer(grace * 0.5, abort)
    timer.daemon = True
    timer.start()
