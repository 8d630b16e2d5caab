"""The server under faults: a flood of requests, clients that disconnect mid-answer, bodies sent a byte at a
time. ``lmforge soak`` starts ``lmforge serve`` on a tiny model in a child process and, round after round,
checks that

- every request gets an answer: 200, or 429 when the queue is full; never a 5xx or a dropped connection;
- another client is answered while the faults go on (its latency is recorded);
- what the faulty clients held is freed: the engine's queue and running batch go back to zero;
- the server's resident memory returns to where it was after the first round.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PROMPT = "The quick brown fox"


@dataclass
class SoakReport:
    rounds: int = 0
    flood: int = 0  # requests sent at once per round
    statuses: dict[str, int] = field(default_factory=dict)  # status code (or error) -> count, all rounds
    disconnects: int = 0
    slow_bodies: int = 0
    probe_seconds: list[float] = field(default_factory=list)  # another client's request, during the faults
    probe_statuses: dict[str, int] = field(default_factory=dict)
    freed: list[bool] = field(default_factory=list)  # queue and batch back to zero after each round
    rss_mb: list[float] = field(default_factory=list)  # the server's resident memory after each round
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict:
        probes = sorted(self.probe_seconds)
        return {"rounds": self.rounds, "flood": self.flood, "statuses": self.statuses,
                "disconnects": self.disconnects, "slow_bodies": self.slow_bodies,
                "probe_seconds_median": round(probes[len(probes) // 2], 3) if probes else None,
                "probe_seconds_max": round(probes[-1], 3) if probes else None, "probe_statuses": self.probe_statuses,
                "freed_every_round": all(self.freed), "rss_mb": [round(m, 1) for m in self.rss_mb],
                "problems": self.problems}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _gauges(text: str) -> dict[str, float]:
    """The engine gauges of a Prometheus scrape (summed over models)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("lmforge_queue_length", "lmforge_running_batch_size")):
            name, value = line.split("{")[0], float(line.rsplit(" ", 1)[1])
            out[name] = out.get(name, 0.0) + value
    return out


async def _flood(client, url: str, count: int, report: SoakReport) -> None:
    async def one(index: int) -> None:
        try:
            answer = await client.post(f"{url}/v1/completions", json={
                "prompt": f"{PROMPT} {index}", "max_tokens": 8, "temperature": 0.8, "seed": index})
            key = str(answer.status_code)
        except Exception as err:  # noqa: BLE001 (a dropped connection is what is counted)
            key = type(err).__name__
        report.statuses[key] = report.statuses.get(key, 0) + 1

    await asyncio.gather(*(one(i) for i in range(count)))


async def _disconnect(client, url: str, count: int) -> None:
    """Streams opened and dropped after their first event."""
    async def one(index: int) -> None:
        async with client.stream("POST", f"{url}/v1/completions", json={
                "prompt": f"{PROMPT} {index}", "max_tokens": 400, "stream": True}) as answer:
            async for _ in answer.aiter_bytes():
                break  # leaving the block closes the connection mid-answer

    await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)


async def _slow_body(port: int, seconds: float) -> None:
    """A request whose body arrives a byte at a time over ``seconds``, then is abandoned."""
    body = json.dumps({"prompt": PROMPT, "max_tokens": 4}).encode()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body) + 1000}\r\n\r\n".encode())
        step = seconds / len(body)
        for byte in body:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(step)
        writer.close()
    except OSError:
        pass


async def _probe(client, url: str, report: SoakReport) -> None:
    """Another client, while the faults go on: one short completion, timed."""
    start = time.perf_counter()
    answer = await client.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0})
    report.probe_seconds.append(time.perf_counter() - start)
    report.probe_statuses[str(answer.status_code)] = report.probe_statuses.get(str(answer.status_code), 0) + 1
    if answer.status_code not in (200, 429):
        report.problems.append(f"the probe got {answer.status_code}: {answer.text[:200]}")


async def _round(url: str, port: int, flood: int, disconnects: int, slow: int, report: SoakReport) -> None:
    import httpx

    limits = httpx.Limits(max_connections=flood + disconnects + 10, max_keepalive_connections=20)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        faults = asyncio.gather(_flood(client, url, flood, report), _disconnect(client, url, disconnects),
                                *(_slow_body(port, 3.0) for _ in range(slow)))
        await asyncio.sleep(0.3)
        for _ in range(3):
            await _probe(client, url, report)
        await faults
    report.disconnects += disconnects
    report.slow_bodies += slow


def _wait_freed(url: str, seconds: float = 30.0) -> bool:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        gauges = _gauges(httpx.get(f"{url}/metrics", timeout=10).text)
        if gauges and all(v == 0 for v in gauges.values()):
            return True
        time.sleep(0.2)
    return False


def soak(rounds: int = 5, flood: int = 1000, disconnects: int = 100, slow: int = 20, max_queue: int = 64,
         folder: Path | None = None, progress: bool = True) -> SoakReport:
    """Serve a tiny model in a child process and put it through ``rounds`` rounds of faults."""
    import tempfile

    import httpx

    from lmforge.checkpoint import save_checkpoint
    from lmforge.reliability.targets import _model, tokenizer

    report = SoakReport(flood=flood)
    with tempfile.TemporaryDirectory(prefix="lmforge-soak-") as scratch:
        folder = Path(folder or scratch)
        save_checkpoint(folder / "model", _model(), tokenizer())
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", str(folder / "model"), "--port",
                                   str(port), "--max-queue", str(max_queue), "--device", "cpu"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start: {server.stderr.read()[-1500:]}")
                time.sleep(0.3)
            for number in range(rounds):
                asyncio.run(_round(url, port, flood, disconnects, slow, report))
                report.rounds += 1
                report.freed.append(_wait_freed(url))
                report.rss_mb.append(_rss_mb(server.pid))
                if not report.freed[-1]:
                    report.problems.append(f"round {number}: the queue or the batch did not go back to zero")
                if server.poll() is not None:
                    report.problems.append(f"round {number}: the server died: {server.stderr.read()[-800:]}")
                    break
                if progress:
                    print(f"[soak] round {number + 1}/{rounds}: {report.statuses}, "
                          f"rss {report.rss_mb[-1]:.0f} MB", file=sys.stderr, flush=True)
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    bad = {k: v for k, v in report.statuses.items() if k not in ("200", "429")}
    if bad:
        report.problems.append(f"answers other than 200 and 429: {bad}")
    if len(report.rss_mb) >= 3 and report.rss_mb[-1] > report.rss_mb[0] * 1.1 + 20:
        report.problems.append(f"memory grew from {report.rss_mb[0]:.0f} MB after the first round to "
                               f"{report.rss_mb[-1]:.0f} MB after the last")
    return report
