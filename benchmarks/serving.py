"""Shared by serve.py and soak.py: servers started as subprocesses, and streamed OpenAI requests.

A server runs on a free loopback port, its output goes to a log file, and it is
stopped (SIGTERM, then SIGKILL) when the ``with`` block ends. A request streams
server-sent events from ``/v1/completions`` or ``/v1/chat/completions`` and records
when each chunk arrived, the way vLLM's ``bench serve`` does: time to first token
is the first chunk carrying generated text (not the chat stream's opening chunk, which
carries only the role), inter-token latencies are the gaps between the text chunks after
it, and the output token count comes from ``usage`` (asked for with
``stream_options.include_usage``), or else is the number of text chunks.

Only loopback addresses are ever contacted.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_loopback(url: str) -> str:
    """``url`` without a trailing slash, or SystemExit when its host is not a loopback address."""
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"{url}: only loopback servers (127.0.0.0/8, ::1, localhost) are load-tested")
    return url.rstrip("/")


@dataclass
class Server:
    """A server process and where to reach it."""

    name: str
    url: str
    process: subprocess.Popen | None = None  # None: a server this script did not start
    log: Path | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log and self.log.exists() else ""


@contextlib.contextmanager
def started(name: str, command: list[str], port: int, log: Path, ready_seconds: float = 600) -> Iterator[Server]:
    """Run ``command`` (a server listening on 127.0.0.1:``port``) until the block ends.

    Ready when ``GET /health`` answers 200 (llama-server answers 503 while it loads).
    """
    print(f"[{name}] starting: {' '.join(command)}", flush=True)
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = Server(name, f"http://127.0.0.1:{port}", process, log)
    try:
        wait_ready(server, ready_seconds)
        yield server
    finally:
        stop(process)


def wait_ready(server: Server, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    started_at = time.monotonic()
    with httpx.Client(trust_env=False, timeout=5) as client:
        while True:
            if server.process is not None and server.process.poll() is not None:
                raise SystemExit(f"[{server.name}] exited with code {server.process.returncode} before it was "
                                 f"ready; log {server.log}:\n{server.log_tail()}")
            try:
                if client.get(server.url + "/health").status_code == 200:
                    print(f"[{server.name}] ready after {time.monotonic() - started_at:.1f} s", flush=True)
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"[{server.name}] not ready after {seconds:.0f} s; log {server.log}:\n"
                                 f"{server.log_tail()}")
            time.sleep(0.25)


def stop(process: subprocess.Popen, grace: float = 20) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def lmforge_command(model: str, port: int, slots: int, slot_context: int, extra: Sequence[str] = ()) -> list[str]:
    """lmforge's server, as ``lmforge serve`` starts it (``extra``: more flags, e.g. ``--compile``).

    Adjust here when the CLI changes.
    """
    return [sys.executable, "-m", "lmforge.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
            "--max-batch-size", str(slots), "--context", str(slot_context), *extra]


def llama_server_command(binary: str, gguf: Path, port: int, slots: int, slot_context: int,
                         threads: int) -> list[str]:
    """llama.cpp's server: ``slots`` parallel sequences sharing a KV cache of slots * slot_context."""
    return [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
            "-t", str(threads), "--ctx-size", str(slots * slot_context), "--no-webui"]


# ---- one streamed request ------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What one request measured. Times are seconds; ``error`` is None for a success."""

    ok: bool = False
    error: str | None = None
    ttft: float = math.nan
    latency: float = math.nan
    itl: list[float] = field(default_factory=list)
    chunks: int = 0  # chunks carrying generated text (a token each, or more where a server merges them)
    output_tokens: int | None = None  # from usage, when the server sent it
    prompt_tokens: int | None = None
    text: str = ""

    @property
    def tokens(self) -> int:
        return self.output_tokens if self.output_tokens is not None else self.chunks


async def stream_request(client: httpx.AsyncClient, url: str, body: dict, chat: bool) -> Outcome:
    """POST ``body`` (``stream`` and ``stream_options`` are added) and time the chunks."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    out = Outcome()
    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", url + path, json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:300]
                out.error = f"HTTP {response.status_code}: {detail}"
                return out
            done = False
            async for event in sse_events(response):
                if event is None:
                    done = True
                    break
                if "error" in event:
                    out.error = f"error event: {json.dumps(event['error'])[:300]}"
                    return out
                if event.get("usage"):
                    out.output_tokens = event["usage"].get("completion_tokens", out.output_tokens)
                    out.prompt_tokens = event["usage"].get("prompt_tokens", out.prompt_tokens)
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if not piece:
                        continue  # the opening chat chunk (its role only), a closing one (finish_reason only)
                    now = time.perf_counter()
                    if out.chunks == 0:
                        out.ttft = now - start
                    else:
                        out.itl.append(now - last)
                    last = now
                    out.chunks += 1
                    out.text += piece or ""
            if not done:
                out.error = "the stream ended without [DONE]"
                return out
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        out.error = f"{type(err).__name__}: {err}"
        return out
    out.latency = time.perf_counter() - start
    out.ok = out.chunks > 0
    if not out.ok:
        out.error = "no tokens streamed"
    return out


def client(concurrency: int, timeout: float = 600) -> httpx.AsyncClient:
    """An HTTP client for ``concurrency`` parallel streams; environment proxies are ignored (loopback only)."""
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    return httpx.AsyncClient(trust_env=False, limits=limits, timeout=httpx.Timeout(timeout, connect=30))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation, NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


async def sse_events(response):
    """The JSON events of a server-sent-events response, then None for ``data: [DONE]``."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            yield None
            return
        yield json.loads(data)
