"""Soak test of a serving process: many concurrent streams for minutes; errors and whether memory stays flat.

Starts ``lmforge serve`` on a free loopback port (or attaches to a running server with
``--url``, loopback only), then keeps ``--streams`` clients busy for ``--minutes``: each
sends streamed completions (some as chat, some abandoned after a few chunks, as a
client that disconnects) one after another, until the time is up or it has sent
``--max-requests`` requests. Meanwhile the server's resident memory (RSS, with its
child processes) is sampled every ``--sample-seconds``. At the end it prints the
requests, errors, throughput and memory: the mean of the first minute after warm-up
against the mean of the last minute, and the slope in between. Exit status 1 when a
request failed or memory grew by more than ``--tolerance``.

    python benchmarks/soak.py                                    # SmolLM2, 64 streams, 5 minutes
    python benchmarks/soak.py --streams 16 --minutes 2 --max-batch-size 8
    python benchmarks/soak.py --url http://127.0.0.1:8000 --pid 12345 --out soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402
from serving import (  # noqa: E402
    Server,
    check_loopback,
    client,
    free_port,
    lmforge_command,
    sse_events,
    started,
    wait_ready,
)

WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing about rivers mountains "
         "cities trains clocks gardens bridges stars music paper water light stone letters numbers").split()
QUESTIONS = ("What is the capital of France?", "Write a haiku about the sea.", "Name three prime numbers.",
             "Explain what a list is in Python.", "Say hello in Spanish.")


def rss_of(pid: int) -> int:
    """Resident bytes of the process and all its children (0 once it is gone)."""
    try:
        process = psutil.Process(pid)
        processes = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in processes:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def listening_pid(port: int) -> int | None:
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return conn.pid
    return None


class Tally:
    def __init__(self):
        self.sent = self.completed = self.cancelled = self.tokens = self.errors = 0
        self.first_errors: list[str] = []

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.first_errors) < 10:
            self.first_errors.append(what)


async def stream_loop(http, url: str, model: str, rng: random.Random, deadline: float, args, tally: Tally) -> None:
    """One client: requests back to back until the deadline or --max-requests (bounded either way)."""
    for _ in range(args.max_requests):
        if time.monotonic() >= deadline:
            return
        chat = rng.random() < args.chat_fraction
        cancel_after = rng.randint(1, 4) if rng.random() < args.cancel_fraction else None
        body = {"model": model, "max_tokens": rng.randint(4, args.max_tokens), "temperature": 0.8, "stream": True,
                "stream_options": {"include_usage": True}}
        if chat:
            body["messages"] = [{"role": "user", "content": rng.choice(QUESTIONS)}]
        else:
            body["prompt"] = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, args.prompt_words)))
        tally.sent += 1
        try:
            async with http.stream("POST", url + ("/v1/chat/completions" if chat else "/v1/completions"),
                                   json=body) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")[:200]
                    tally.error(f"HTTP {response.status_code}: {text}")
                    continue
                chunks, done, failed = 0, False, False
                async for event in sse_events(response):
                    if event is None:
                        done = True
                        break
                    if "error" in event:
                        tally.error(f"error event: {json.dumps(event['error'])[:200]}")
                        failed = True
                        break
                    if event.get("usage"):
                        tally.tokens += event["usage"].get("completion_tokens", 0)
                    chunks += bool(event.get("choices"))
                    if cancel_after is not None and chunks >= cancel_after:
                        break  # leaving the block closes the connection mid-stream
                if done:
                    tally.completed += 1
                elif cancel_after is not None and not failed:
                    tally.cancelled += 1
                elif not failed:
                    tally.error("the stream ended without [DONE]")
        except Exception as err:  # a transport error is a finding, not a crash of the soak
            tally.error(f"{type(err).__name__}: {err}")


async def soak(server: Server, pid: int, model: str, args) -> dict:
    tally = Tally()
    samples: list[tuple[float, int]] = []
    start = time.monotonic()
    deadline = start + args.minutes * 60

    async def sample():
        last_print = start
        while time.monotonic() < deadline:
            now = time.monotonic()
            samples.append((now - start, rss_of(pid)))
            if now - last_print >= 30:
                last_print = now
                print(f"  {now - start:5.0f} s: {tally.sent} sent, {tally.completed} completed, {tally.cancelled} "
                      f"abandoned, {tally.errors} errors, RSS {samples[-1][1] / 2**20:.0f} MiB", flush=True)
            await asyncio.sleep(args.sample_seconds)
        samples.append((time.monotonic() - start, rss_of(pid)))

    async with client(args.streams, timeout=args.request_timeout) as http:
        rngs = [random.Random(args.seed * 100003 + i) for i in range(args.streams)]
        await asyncio.gather(sample(), *(stream_loop(http, server.url, model, rng, deadline, args, tally)
                                         for rng in rngs))
    seconds = time.monotonic() - start
    return {"seconds": seconds, "sent": tally.sent, "completed": tally.completed, "abandoned": tally.cancelled,
            "errors": tally.errors, "first_errors": tally.first_errors, "output_tokens": tally.tokens,
            "requests_per_s": tally.completed / seconds, "output_tokens_per_s": tally.tokens / seconds,
            "memory": memory_verdict(samples, args), "rss_samples": samples}


def memory_verdict(samples: list[tuple[float, int]], args) -> dict:
    """First window after warm-up against the last window (60 s each, less on a short run), and the slope."""
    end = samples[-1][0]
    warm = min(args.warmup_seconds, end / 4)
    window = min(60.0, (end - warm) / 3)
    first = [rss for t, rss in samples if warm <= t < warm + window]
    last = [rss for t, rss in samples if t >= end - window]
    if not first or not last:
        return {"flat": None, "why": "too few samples"}
    first_mean, last_mean = statistics.fmean(first), statistics.fmean(last)
    steady = [(t, rss) for t, rss in samples if t >= warm]
    slope = statistics.linear_regression([t for t, _ in steady], [rss for _, rss in steady]).slope \
        if len(steady) > 1 else 0.0
    growth = last_mean - first_mean
    return {"warmup_s": warm, "window_s": window, "first_mib": first_mean / 2**20, "last_mib": last_mean / 2**20,
            "max_mib": max(rss for _, rss in samples) / 2**20, "growth_mib": growth / 2**20,
            "growth_fraction": growth / first_mean, "slope_mib_per_min": slope * 60 / 2**20,
            "flat": growth <= args.tolerance * first_mean}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="what lmforge serve serves")
    parser.add_argument("--url", help="soak this running server (loopback) instead of starting lmforge serve")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id (default: who listens)")
    parser.add_argument("--streams", type=int, default=64, help="concurrent clients")
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--max-requests", type=int, default=10000, help="at most this many requests per client")
    parser.add_argument("--max-tokens", type=int, default=48, help="answers are 4 to this many tokens")
    parser.add_argument("--prompt-words", type=int, default=64, help="completion prompts are 4 to this many words")
    parser.add_argument("--chat-fraction", type=float, default=0.5, help="share of requests sent as chat")
    parser.add_argument("--cancel-fraction", type=float, default=0.1,
                        help="share of requests abandoned after a few chunks")
    parser.add_argument("--max-batch-size", type=int, default=16, help="lmforge serve --max-batch-size")
    parser.add_argument("--slot-context", type=int, default=512, help="lmforge serve --context")
    parser.add_argument("--sample-seconds", type=float, default=5, help="RSS sampling period")
    parser.add_argument("--warmup-seconds", type=float, default=60, help="left out of the memory comparison")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="memory counts as flat when the last minute's mean is within this fraction above "
                             "the first minute's")
    parser.add_argument("--request-timeout", type=float, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results (with every RSS sample) as JSON here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on `kill` too

    print(f"machine: {machine()}")
    print(f"{args.streams} streams for {args.minutes:g} min; answers up to {args.max_tokens} tokens; "
          f"{args.chat_fraction:.0%} chat, {args.cancel_fraction:.0%} abandoned mid-stream", flush=True)
    if args.url:
        server = Server("server", check_loopback(args.url))
        wait_ready(server, 60)
        pid = args.pid or listening_pid(int(args.url.rsplit(":", 1)[1].split("/")[0]))
        if pid is None:
            raise SystemExit("cannot tell which process serves --url: pass --pid")
        result = asyncio.run(soak(server, pid, args.model, args))
    else:
        with tempfile.TemporaryDirectory(prefix="lmforge-soak-") as tmp:
            port = free_port()
            command = lmforge_command(args.model, port, args.max_batch_size, args.slot_context)
            with started("lmforge", command, port, Path(tmp) / "serve.log") as server:
                result = asyncio.run(soak(server, server.pid, model_id(server.url, args.model), args))
                if server.process.poll() is not None:
                    result["first_errors"].append(f"the server exited with {server.process.returncode}")
                    result["errors"] += 1

    memory = result["memory"]
    print(f"\n{result['sent']} requests in {result['seconds']:.0f} s: {result['completed']} completed, "
          f"{result['abandoned']} abandoned by the client, {result['errors']} errors; "
          f"{result['requests_per_s']:.2f} req/s, {result['output_tokens_per_s']:.1f} output tok/s")
    for error in result["first_errors"]:
        print(f"  error: {error}")
    if memory.get("flat") is None:
        print(f"memory: {memory['why']}")
    else:
        print(f"memory (RSS with children): first {memory['window_s']:.0f} s after a {memory['warmup_s']:.0f} s "
              f"warm-up {memory['first_mib']:.1f} MiB, last {memory['window_s']:.0f} s {memory['last_mib']:.1f} MiB "
              f"({memory['growth_mib']:+.1f} MiB, {memory['growth_fraction']:+.1%}), slope "
              f"{memory['slope_mib_per_min']:+.2f} MiB/min, peak {memory['max_mib']:.1f} MiB: "
              + ("FLAT" if memory["flat"] else f"GREW more than {args.tolerance:.0%}"))
    if args.out:
        report = {"date": datetime.date.today().isoformat(), "machine": machine(), "command": sys.argv,
                  "args": vars(args), **result}
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    sys.exit(0 if result["errors"] == 0 and memory.get("flat") else 1)


def model_id(url: str, fallback: str) -> str:
    import httpx

    try:
        with httpx.Client(trust_env=False, timeout=10) as http:
            return http.get(url + "/v1/models").json()["data"][0]["id"]
    except Exception:
        return fallback


if __name__ == "__main__":
    main()
