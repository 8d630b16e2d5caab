"""The engines' thread: the HTTP side talks to it through inboxes and per-request queues.

An :class:`~lmforge.infer.engine.Engine` knows nothing of HTTP and is not thread-safe;
one thread drives it and loops: take new requests and aborts from the inbox, run one
engine step, hand each output to its request's asyncio queue (thread-safely, on the
server's event loop). With nothing to do it sleeps until a request arrives. Other work
that needs the model (embeddings) is queued the same way and runs between two steps.

Which thread: ``lmforge serve`` drives every model's engine from the main thread
(:func:`drive`), the one that loaded the models, and runs the HTTP server in another.
PyTorch's CPU kernels run on an OpenMP pool that belongs to the calling thread; a
second thread doing tensor work gets a second pool, and two pools on 2 cores make
every parallel region wait for a descheduled thread: a SmolLM2 decode step measured
19.6 tokens/s on the loading thread and 13 on another one. ``start()`` (a thread of
its own) is for tests and embedding the app in another server.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

from lmforge.infer.engine import Engine
from lmforge.infer.request import Request, RequestOutput

log = logging.getLogger("lmforge.serve")


class EngineWorker:
    def __init__(self, engine: Engine, name: str = "engine"):
        self.engine = engine
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.sinks: dict[str, Sink] = {}  # engine thread only
        self.in_flight = 0  # requests submitted and not yet finished (event-loop thread only)
        self.name, self._stop = name, threading.Event()
        self.thread: threading.Thread | None = None
        self.doorbell = threading.Event()  # set when the inbox gets something (shared by driven workers)

    def start(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            raise RuntimeError(f"the engine of {self.name!r} already has a thread (one server per model)")
        self._stop.clear()
        self.thread = threading.Thread(target=self._run, name=f"lmforge-{self.name}", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is still running and end the thread."""
        self._stop.set()
        self._post(("wake",))
        if self.thread is not None:
            self.thread.join(timeout)

    @property
    def queued(self) -> int:
        """Requests that have no slot yet."""
        return max(0, self.in_flight - self.engine.max_batch_size)

    async def submit(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Add ``request`` and yield its outputs as the engine makes them.

        Leaving the iteration early (a client that went away, a cancelled task) aborts the
        request in the engine, which frees its slot at the next step.
        """
        outputs: asyncio.Queue = asyncio.Queue()
        sink = Sink(asyncio.get_running_loop(), outputs)
        self.in_flight += 1
        finished = False
        try:
            self._post(("add", request, sink))
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self.in_flight -= 1
            if not finished:
                self._post(("abort", request.request_id))

    def abort_all(self) -> None:
        """End every request now (shutdown): each stream gets its last output, finish reason "abort"."""
        self._post(("abort_all",))

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the engine's thread between two steps; a Future of its result."""
        future: Future = Future()
        self._post(("call", fn, future))
        return future

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _post(self, item: tuple) -> None:
        self.inbox.put(item)
        self.doorbell.set()

    # ---- the driving thread -----------------------------------------------------------------------

    def _run(self) -> None:
        drive([self])

    def turn(self) -> bool:
        """Take the inbox and run one engine step; True while the engine has work left."""
        while True:
            try:
                self._handle(self.inbox.get_nowait())
            except queue.Empty:
                break
        if self._stop.is_set():
            self._fail_all(RuntimeError("the server is shutting down"))
            return False
        if not self.engine.has_work:
            return False
        try:
            outputs = self.engine.step()
        except Exception as err:  # a bug: fail the running requests, keep serving
            log.exception("engine step failed")
            self._fail_all(err)
            return False
        deliveries: dict[asyncio.AbstractEventLoop, list] = {}  # one wake-up per event loop and step
        for output in outputs:
            sink = self.sinks.get(output.request_id)
            if sink is not None:
                deliveries.setdefault(sink.loop, []).append((sink.queue, output))
            if output.finished:
                self.sinks.pop(output.request_id, None)
        for loop, items in deliveries.items():
            loop.call_soon_threadsafe(_put_all, items)
        return self.engine.has_work

    def _handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "add":
            _, request, sink = item
            try:
                self.engine.add(request)
            except ValueError as err:
                sink(err)
                return
            self.sinks[request.request_id] = sink
        elif kind == "abort":
            self.engine.abort(item[1])
        elif kind == "abort_all":
            for request_id in list(self.sinks):
                self.engine.abort(request_id)
        elif kind == "call":
            _, fn, future = item
            try:
                future.set_result(fn())
            except BaseException as err:  # handed to the caller
                future.set_exception(err)

    def _fail_all(self, err: BaseException) -> None:
        for request_id, sink in list(self.sinks.items()):
            self.engine.abort(request_id)
            sink(err)
        self.sinks.clear()
        try:
            while self.engine.has_work:
                self.engine.step()  # flush the aborts (nothing is left to decode)
        except Exception:
            log.exception("engine step failed while clearing the batch")


class Sink:
    """Where a request's outputs go: an asyncio queue, filled on its own event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, outputs: asyncio.Queue):
        self.loop, self.queue = loop, outputs

    def __call__(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for outputs, item in items:
        outputs.put_nowait(item)


def drive(workers: list[EngineWorker]) -> None:
    """Drive ``workers``' engines from the calling thread, taking turns, until every one is stopped."""
    doorbell = threading.Event()
    for worker in workers:
        worker.doorbell = doorbell
    while True:
        doorbell.clear()
        busy = [w.turn() for w in workers]  # a stopped worker's turn fails what it still holds
        if all(w.stopped for w in workers):
            return
        if not any(busy):
            doorbell.wait(0.5)
