"""Serving throughput and latency: lmforge's server against llama.cpp's llama-server, same weights.

Starts each server as a subprocess on a free loopback port (llama-server on the model
exported with ``lmforge export --format gguf``, lmforge on the model itself), then, for
each concurrency level, streams requests from that many parallel clients and reports
what vLLM's ``bench serve`` reports: request throughput, output tokens/s, time to first
token (TTFT) and inter-token latency (ITL) p50/p99, and errors. Two request sets:

* fixed: every prompt ``--input-len`` tokens, every answer ``--output-len`` tokens
  (``max_tokens`` with ``ignore_eos``, which both servers accept);
* mixed: prompt and answer lengths drawn (seeded) from ``--mixed-input`` and
  ``--mixed-output``; the same requests for both servers.

Then a prefix-cache check: two-turn chats (turn 2's prompt = turn 1 + its answer + a
new user message), TTFT of turn 2 against turn 1 and against the same turn-2 prompt
with nothing cached. The backends run back to back on one machine, and the ratios
lmforge / llama.cpp (output tokens/s) and c8 / c1 are printed at the end.

    python benchmarks/serve.py --llama-server PATH/llama-server                 # both, SmolLM2-135M
    python benchmarks/serve.py --llama-server PATH/llama-server --backends llama.cpp --concurrency 1 8
    python benchmarks/serve.py --model llama-42m --llama-server PATH/llama-server --out serve.json

Same weights: lmforge serves the model as it loads it (the packaged SmolLM2 is a Q4_1
GGUF, dequantized on load), llama-server the export of those weights as ``--gguf-type``
(f16 by default: rounded to 16 bits). llama-server runs ``--threads`` threads; lmforge
uses torch's default (one per core). Prompts are runs of words that are one token each
in the model's vocabulary, so a prompt has exactly the tokens asked for. Output tokens are counted from ``usage``
(``stream_options.include_usage``), or else as streamed chunks.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import random
import re
import shlex
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402
from serving import (  # noqa: E402
    Outcome,
    Server,
    check_loopback,
    client,
    free_port,
    llama_server_command,
    lmforge_command,
    percentile,
    started,
    stream_request,
    wait_ready,
)

from lmforge.checkpoint import load_tokenizer, save_checkpoint
from lmforge.interop.convert import export_checkpoint
from lmforge.model import PRESETS, DecoderLM, preset

BACKENDS = ("llama.cpp", "lmforge")


# ---- the model and its prompts --------------------------------------------------------------------------------

def prepare_model(name: str, folder: Path, gguf_type: str, need_gguf: bool) -> tuple[str, Path | None, object]:
    """(what lmforge serves, the GGUF llama-server serves, the tokenizer).

    A preset name (``llama-42m``) gets random weights, as benchmarks/decode.py builds it, and a
    byte-level BPE of the preset's vocabulary size trained on lmforge's built-in corpus (a few
    seconds), saved together as a checkpoint: a server decodes every id the model can emit.
    """
    if name in PRESETS:
        from lmforge.data.builtin import iter_builtin
        from lmforge.tokenizer import train_tokenizer

        torch.manual_seed(0)
        model = DecoderLM(preset(name)).eval()
        tokenizer = train_tokenizer([doc.text for doc in iter_builtin()], model.config.vocab_size)
        if tokenizer.vocab_size != model.config.vocab_size:
            raise SystemExit(f"the tokenizer has {tokenizer.vocab_size} ids, the model {model.config.vocab_size}")
        served = str(save_checkpoint(folder / "checkpoint", model, tokenizer))
        print(f"{name}: random weights, {model.num_parameters() / 1e6:.1f}M parameters, checkpoint {served}")
    else:
        served, tokenizer = name, load_tokenizer(name)
    gguf = None
    if need_gguf:
        t0 = time.perf_counter()
        gguf = export_checkpoint(served, folder / f"model-{gguf_type}.gguf", "gguf", gguf_type)
        print(f"exported {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s")
    return served, gguf, tokenizer


def one_token_words(tokenizer) -> list[str]:
    """Words (" cat") that the tokenizer encodes as one token each, whatever surrounds them."""
    words = []
    for token_id in range(tokenizer.vocab_size):
        try:
            text = tokenizer.decode([token_id])
        except Exception:  # ids without a piece
            continue
        if re.fullmatch(r" [a-z]{2,12}", text) and tokenizer.encode(text) == [token_id]:
            words.append(text)
    if len(words) < 50:
        raise SystemExit(f"the tokenizer has only {len(words)} one-token words: cannot build prompts")
    return words


class PromptMaker:
    """Prompts of an exact token count: runs of one-token words, seeded."""

    def __init__(self, tokenizer, seed: int):
        self.tokenizer, self.words, self.rng = tokenizer, one_token_words(tokenizer), random.Random(seed)

    def text(self, tokens: int) -> str:
        text = "".join(self.rng.choice(self.words) for _ in range(tokens))
        assert len(self.tokenizer.encode(text)) == tokens
        return text


def fixed_set(maker: PromptMaker, count: int, input_len: int, output_len: int) -> list[dict]:
    return [{"prompt": maker.text(input_len), "max_tokens": output_len} for _ in range(count)]


def mixed_set(maker: PromptMaker, count: int, inputs: tuple[int, int], outputs: tuple[int, int]) -> list[dict]:
    rng = maker.rng
    return [{"prompt": maker.text(rng.randint(*inputs)), "max_tokens": rng.randint(*outputs)} for _ in range(count)]


# ---- load ---------------------------------------------------------------------------------------------------

async def run_level(url: str, model: str, requests: list[dict], concurrency: int,
                    timeout: float) -> tuple[list[Outcome], float]:
    """All ``requests`` through ``concurrency`` parallel streams; (outcomes in order, wall seconds)."""
    outcomes: list[Outcome | None] = [None] * len(requests)
    queue = list(enumerate(requests))
    queue.reverse()

    async with client(concurrency, timeout) as http:
        async def worker():
            while queue:
                index, request = queue.pop()
                body = {"model": model, "temperature": 0, "ignore_eos": True, **request}
                outcomes[index] = await stream_request(http, url, body, chat=False)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return outcomes, time.perf_counter() - start


def summarize(outcomes: list[Outcome], seconds: float, requests: list[dict]) -> dict:
    good = [o for o in outcomes if o.ok]
    tokens = sum(o.tokens for o in good)
    itl = [gap for o in good for gap in o.itl]
    tpot = [(o.latency - o.ttft) / (o.tokens - 1) for o in good if o.tokens > 1]
    short = sum(1 for o, r in zip(outcomes, requests) if o.ok and o.tokens != r["max_tokens"])
    errors = [o.error for o in outcomes if not o.ok]
    return {
        "requests": len(outcomes), "completed": len(good), "errors": len(errors), "first_errors": errors[:3],
        "seconds": seconds, "request_throughput": len(good) / seconds, "output_tokens": tokens,
        "output_tokens_per_s": tokens / seconds,
        "prompt_tokens": sum(o.prompt_tokens or 0 for o in good),
        "usage_reported": all(o.output_tokens is not None for o in good),
        "answers_not_of_max_tokens": short,
        "ttft_ms_p50": 1e3 * percentile([o.ttft for o in good], 50),
        "ttft_ms_p99": 1e3 * percentile([o.ttft for o in good], 99),
        "itl_ms_p50": 1e3 * percentile(itl, 50), "itl_ms_p99": 1e3 * percentile(itl, 99),
        "tpot_ms_mean": 1e3 * statistics.fmean(tpot) if tpot else math.nan,
    }


async def prefix_check(url: str, model: str, maker: PromptMaker, args) -> dict:
    """TTFT of turn 2 of a chat (its prefix cached from turn 1) vs turn 1 and vs turn 2 sent cold."""
    trials, prefix_len, answer_len, follow_len = args.prefix_trials, args.prefix_len, args.prefix_answer, \
        args.prefix_follow
    rows = []
    chat, first_ask = True, True
    async with client(1, args.request_timeout) as http:
        for _ in range(trials):
            system, question = maker.text(prefix_len // 2), maker.text(prefix_len - prefix_len // 2)
            follow = maker.text(follow_len)
            first = [{"role": "system", "content": system}, {"role": "user", "content": question}]

            async def ask(messages: list[dict], max_tokens: int) -> Outcome:
                nonlocal chat, first_ask
                body = {"model": model, "temperature": 0, "max_tokens": max_tokens}
                if chat:
                    out = await stream_request(http, url, {**body, "messages": messages}, chat=True)
                    was_first, first_ask = first_ask, False
                    if out.ok or not was_first:
                        return out
                    # a model without a chat template: the same turns as plain text
                    print(f"  chat request failed ({out.error}); using /v1/completions with plain text")
                    chat = False
                text = "".join(f"{m['role']}:{m['content']}\n" for m in messages) + "assistant:"
                return await stream_request(http, url, {**body, "prompt": text}, chat=False)

            one = await ask(first, answer_len)
            second = [*first, {"role": "assistant", "content": one.text}, {"role": "user", "content": follow}]
            two = await ask(second, answer_len)
            cold_first = [{"role": "system", "content": maker.text(prefix_len // 2)}, first[1]]
            cold = await ask([*cold_first, *second[2:]], answer_len)
            if not (one.ok and two.ok and cold.ok):
                return {"error": one.error or two.error or cold.error}
            rows.append((one, two, cold))

    def median(values: list[float]) -> float:
        return statistics.median(values)

    t1, t2, tc = (median([r[i].ttft for r in rows]) for i in range(3))
    return {"endpoint": "chat" if chat else "completions", "trials": trials,
            "turn1_prompt_tokens": rows[0][0].prompt_tokens, "turn2_prompt_tokens": rows[0][1].prompt_tokens,
            "turn1_ttft_ms": 1e3 * t1, "turn2_ttft_ms": 1e3 * t2, "turn2_cold_ttft_ms": 1e3 * tc,
            "turn2_over_turn1": t2 / t1, "turn2_over_cold": t2 / tc}


async def bench_server(server: Server, model: str, sets: dict[str, dict[int, list[dict]]], args,
                       maker: PromptMaker) -> dict:
    out: dict = {"sets": {}}
    warm = fixed_set(maker, args.warmup, args.input_len, 8)
    if warm:
        outcomes, _ = await run_level(server.url, model, warm, 1, args.request_timeout)
        failed = [o.error for o in outcomes if not o.ok]
        if failed:
            print(f"[{server.name}] warm-up failed: {failed[0]}")
    for set_name, levels in sets.items():
        out["sets"][set_name] = {}
        for concurrency, requests in levels.items():
            outcomes, seconds = await run_level(server.url, model, requests, concurrency, args.request_timeout)
            row = summarize(outcomes, seconds, requests)
            out["sets"][set_name][concurrency] = row
            print(f"[{server.name}] {set_name:5s} c={concurrency:<3d} {row['completed']}/{row['requests']} ok, "
                  f"{row['request_throughput']:.2f} req/s, {row['output_tokens_per_s']:.1f} out tok/s, "
                  f"TTFT p50 {row['ttft_ms_p50']:.0f} ms, ITL p50 {row['itl_ms_p50']:.1f} ms"
                  + (f", errors: {row['first_errors'][0]}" if row["errors"] else ""), flush=True)
    if args.prefix_trials:
        out["prefix_cache"] = await prefix_check(server.url, model, maker, args)
        print(f"[{server.name}] prefix cache: {json.dumps(out['prefix_cache'])}", flush=True)
    return out


# ---- the backends ---------------------------------------------------------------------------------------------

def run_llama_cpp(args, gguf: Path, folder: Path, sets, maker) -> dict:
    if args.llama_url:
        return asyncio.run(bench_server(attach("llama.cpp", args.llama_url), "model", sets, args, maker))
    port = free_port()
    command = llama_server_command(args.llama_server, gguf, port, max(args.concurrency), args.slot_context,
                                   args.threads)
    with started("llama.cpp", command, port, folder / "llama-server.log") as server:
        return asyncio.run(bench_server(server, "model", sets, args, maker))


def run_lmforge(args, served: str, folder: Path, sets, maker) -> dict:
    """lmforge's side: its server started with as many batch slots as the highest concurrency."""
    if args.lmforge_url:
        return asyncio.run(bench_server(attach("lmforge", args.lmforge_url), served, sets, args, maker))
    port = free_port()
    command = lmforge_command(served, port, max(args.concurrency), args.slot_context, shlex.split(args.lmforge_args))
    with started("lmforge", command, port, folder / "lmforge-serve.log", args.ready_seconds) as server:
        model = first_model_id(server.url) or served
        return asyncio.run(bench_server(server, model, sets, args, maker))


def attach(name: str, url: str) -> Server:
    server = Server(name, check_loopback(url))
    wait_ready(server, 60)
    return server


def first_model_id(url: str) -> str | None:
    import httpx

    try:
        with httpx.Client(trust_env=False, timeout=10) as http:
            return http.get(url + "/v1/models").json()["data"][0]["id"]
    except Exception:
        return None


# ---- report ---------------------------------------------------------------------------------------------------

def print_tables(results: dict) -> None:
    for set_name in next(iter(results.values()))["sets"]:
        print(f"\n{set_name} set")
        print("| backend | concurrency | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms "
              "| errors |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for backend, result in results.items():
            for concurrency, row in result["sets"][set_name].items():
                print(f"| {backend} | {concurrency} | {row['request_throughput']:.2f} | {row['output_tokens_per_s']:.1f} "
                      f"| {row['ttft_ms_p50']:.0f} | {row['ttft_ms_p99']:.0f} | {row['itl_ms_p50']:.1f} "
                      f"| {row['itl_ms_p99']:.1f} | {row['errors']} |")
    prefix = {b: r["prefix_cache"] for b, r in results.items() if "prefix_cache" in r}
    if prefix:
        print("\nprefix cache (two-turn chat, median TTFT)")
        print("| backend | turn 1 ms | turn 2 ms | turn 2 cold ms | turn 2 / turn 1 | turn 2 / cold |")
        print("|---|---:|---:|---:|---:|---:|")
        for backend, row in prefix.items():
            if "error" in row:
                print(f"| {backend} | error: {row['error']} |")
                continue
            print(f"| {backend} | {row['turn1_ttft_ms']:.0f} ({row['turn1_prompt_tokens']} tokens) "
                  f"| {row['turn2_ttft_ms']:.0f} ({row['turn2_prompt_tokens']} tokens) | {row['turn2_cold_ttft_ms']:.0f} "
                  f"| {row['turn2_over_turn1']:.2f} | {row['turn2_over_cold']:.2f} |")


def ratios(results: dict) -> dict:
    out: dict = {}
    for set_name in next(iter(results.values()))["sets"]:
        speed = {b: {c: row["output_tokens_per_s"] for c, row in r["sets"][set_name].items()}
                 for b, r in results.items()}
        if "lmforge" in speed and "llama.cpp" in speed:
            out[f"{set_name}: lmforge / llama.cpp output tok/s"] = {
                c: speed["lmforge"][c] / speed["llama.cpp"][c] for c in speed["lmforge"] if speed["llama.cpp"][c]}
        for backend, levels in speed.items():
            if 1 in levels and 8 in levels and levels[1]:
                out[f"{set_name}: {backend} c8 / c1 output tok/s"] = levels[8] / levels[1]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="a preset (random weights, e.g. llama-42m) or any model lmforge loads")
    parser.add_argument("--llama-server", help="path of llama.cpp's llama-server binary")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests-per-stream", type=int, default=4,
                        help="requests per concurrency level = this x concurrency (at least --min-requests)")
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--sets", nargs="+", choices=("fixed", "mixed"), default=["fixed", "mixed"])
    parser.add_argument("--input-len", type=int, default=128, help="fixed set: prompt tokens")
    parser.add_argument("--output-len", type=int, default=64, help="fixed set: output tokens")
    parser.add_argument("--mixed-input", type=int, nargs=2, default=[16, 512], metavar=("MIN", "MAX"))
    parser.add_argument("--mixed-output", type=int, nargs=2, default=[8, 128], metavar=("MIN", "MAX"))
    parser.add_argument("--slot-context", type=int, default=1024, help="context per slot (server KV cache)")
    parser.add_argument("--threads", type=int, default=2, help="llama-server -t")
    parser.add_argument("--gguf-type", default="f16", help="GGUF type llama-server is given (f32, f16, bf16, q8_0)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests before a backend's first level")
    parser.add_argument("--prefix-trials", type=int, default=3, help="two-turn chats for the prefix check (0: none)")
    parser.add_argument("--prefix-len", type=int, default=512, help="turn 1 prompt words (system + user)")
    parser.add_argument("--prefix-answer", type=int, default=32, help="max tokens of each answer")
    parser.add_argument("--prefix-follow", type=int, default=16, help="words of turn 2's user message")
    parser.add_argument("--request-timeout", type=float, default=300, help="seconds before a request counts as failed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--llama-url", help="use this running llama-server instead of starting one")
    parser.add_argument("--lmforge-args", default="",
                        help='more flags for lmforge serve, as one argument: --lmforge-args="--compile"')
    parser.add_argument("--ready-seconds", type=float, default=1200,
                        help="how long a server may take to start (--compile compiles every batch bucket first)")
    parser.add_argument("--lmforge-url", help="use this running lmforge server instead of starting one")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on `kill` too
    if "llama.cpp" in args.backends and not (args.llama_server or args.llama_url):
        parser.error("llama.cpp needs --llama-server PATH (or --llama-url); or pass --backends lmforge")
    longest = max(args.input_len + args.output_len, sum(x[1] for x in (args.mixed_input, args.mixed_output)),
                  args.prefix_len + args.prefix_follow + 2 * args.prefix_answer + 64)  # 64: chat template
    if longest > args.slot_context:
        parser.error(f"--slot-context {args.slot_context} is shorter than the longest request ({longest} tokens)")

    with tempfile.TemporaryDirectory(prefix="lmforge-serve-bench-") as tmp:
        folder = Path(tmp)
        need_gguf = "llama.cpp" in args.backends and not args.llama_url
        served, gguf, tokenizer = prepare_model(args.model, folder, args.gguf_type, need_gguf)
        maker = PromptMaker(tokenizer, args.seed)
        sets: dict[str, dict[int, list[dict]]] = {}
        for set_name in args.sets:
            sets[set_name] = {}
            for concurrency in args.concurrency:
                count = max(args.min_requests, args.requests_per_stream * concurrency)
                sets[set_name][concurrency] = (
                    fixed_set(maker, count, args.input_len, args.output_len) if set_name == "fixed"
                    else mixed_set(maker, count, tuple(args.mixed_input), tuple(args.mixed_output)))
        print(f"machine: {machine()}")
        print(f"model {args.model}; llama.cpp gets a {args.gguf_type} GGUF of the same weights; concurrency "
              f"{args.concurrency}; fixed set {args.input_len} -> {args.output_len} tokens; mixed set prompts "
              f"{args.mixed_input[0]}-{args.mixed_input[1]}, outputs {args.mixed_output[0]}-{args.mixed_output[1]} "
              f"tokens; {args.requests_per_stream} requests per stream (at least {args.min_requests})", flush=True)
        results: dict[str, dict] = {}
        for backend in args.backends:
            maker.rng = random.Random(args.seed + 1)  # the same prefix-check chats for every backend
            if backend == "llama.cpp":
                results[backend] = run_llama_cpp(args, gguf, folder, sets, maker)
            else:
                results[backend] = run_lmforge(args, served, folder, sets, maker)
    print_tables(results)
    found = ratios(results)
    if found:
        print("\nratios")
        for name, value in found.items():
            shown = ", ".join(f"c{c}: {v:.2f}x" for c, v in value.items()) if isinstance(value, dict) \
                else f"{value:.2f}x"
            print(f"  {name}: {shown}")
    if args.out:
        report = {"date": datetime.date.today().isoformat(), "machine": machine(), "command": sys.argv,
                  "args": vars(args), "results": results, "ratios": found}
        Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
