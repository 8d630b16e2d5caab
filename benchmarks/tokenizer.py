"""Tokenizer benchmark: lmforge against Hugging Face ``tokenizers`` and ``tiktoken`` on the same text.

Measures, in one run on one corpus (Python standard library sources plus the
``pydoc_data`` language reference, read at run time):

* training time of ``lmforge.tokenizer.train_tokenizer`` against a plain
  ``tokenizers`` byte-level BPE trainer (GPT-2 pre-tokenizer) at the same vocabulary size;
* encoding throughput in MB/s (UTF-8 bytes of input per second), one text at a
  time on one thread and as one batch on all cores, for lmforge's ``Tokenizer``,
  ``tokenizers`` loading the same ``tokenizer.json``, and a ``tiktoken.Encoding``
  built from the same ranks (tiktoken's published encodings need a download).

Usage: ``python benchmarks/tokenizer.py [--quick] [--megabytes 8] [--vocab-sizes 8192 32768]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import tiktoken
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer
from lmforge.tokenizer.bytelevel import CHAR_TO_BYTE, SPLIT_PATTERN


def read_corpus(megabytes: float) -> list[str]:
    """The language reference topics, then standard library sources in path order, up to ``megabytes``."""
    from pydoc_data.topics import topics

    texts = list(topics.values())
    total = sum(len(text.encode()) for text in texts)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if total >= megabytes * 1e6:
            break
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few test files are deliberately not UTF-8
        texts.append(text)
        total += len(text.encode())
    return texts


def train_plain_tokenizers(texts: list[str], vocab_size: int) -> tokenizers.Tokenizer:
    """The usual ``tokenizers`` byte-level BPE recipe (GPT-2's pre-tokenizer), same specials and size."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def tiktoken_from_file(path: Path) -> tiktoken.Encoding:
    """A ``tiktoken.Encoding`` built independently from a ``tokenizer.json``'s vocabulary (id = rank)."""
    config = json.loads(path.read_text(encoding="utf-8"))
    specials = {token["content"]: token["id"] for token in config["added_tokens"]}
    ranks = {
        bytes(CHAR_TO_BYTE[char] for char in token): index
        for token, index in config["model"]["vocab"].items()
        if token not in specials
    }
    return tiktoken.Encoding("bench", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def encode_runs(
    texts: list[str], ours: Tokenizer, hf: tokenizers.Tokenizer, encoding: tiktoken.Encoding, threads: int
) -> dict[str, dict[str, Callable[[], object]]]:
    """Mode -> {encoder name: a call that encodes all ``texts``}; lmforge first, then tokenizers, then tiktoken."""
    return {
        "one thread, one text at a time": {
            "lmforge Tokenizer.encode": lambda: [ours.encode(text) for text in texts],
            "tokenizers Tokenizer.encode": lambda: [
                hf.encode(text, add_special_tokens=False) for text in texts
            ],
            "tiktoken encode_ordinary": lambda: [encoding.encode_ordinary(text) for text in texts],
        },
        f"batch, {threads} threads": {
            "lmforge Tokenizer.encode_batch": lambda: ours.encode_batch(texts, num_threads=threads),
            "tokenizers encode_batch": lambda: hf.encode_batch(texts, add_special_tokens=False),
            "tiktoken encode_ordinary_batch": lambda: encoding.encode_ordinary_batch(
                texts, num_threads=threads
            ),
        },
    }


def best_times(runs: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Fastest of ``repeat`` timed runs of each, after one untimed warm-up (caches, thread pools).

    Rounds are interleaved (A, B, C, A, B, C, ...) so that a change in background
    load mid-benchmark hits every contender alike rather than one of them.
    """
    best = {name: float("inf") for name in runs}
    for round_index in range(repeat + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if round_index > 0:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 MB, vocab 8192, one timed run each")
    parser.add_argument(
        "--megabytes", type=float, default=None, help="corpus size in MB (default 8; quick 1)"
    )
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=None, help="default 8192 32768")
    parser.add_argument(
        "--repeat", type=int, default=None, help="timed runs per encode measurement (default 3)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    megabytes = args.megabytes or (1.0 if args.quick else 8.0)
    vocab_sizes = args.vocab_sizes or ([8192] if args.quick else [8192, 32768])
    repeat = args.repeat or (1 if args.quick else 3)
    threads = os.cpu_count() or 1

    texts = read_corpus(megabytes)
    num_bytes = sum(len(text.encode()) for text in texts)
    mb = num_bytes / 1e6
    print(f"machine: {cpu_name()}, {threads} threads; Python {platform.python_version()}")
    print(f"versions: tokenizers {tokenizers.__version__}, tiktoken {tiktoken.__version__}")
    print(f"corpus: {len(texts)} texts, {mb:.2f} MB (pydoc topics + stdlib sources)\n")

    results: list[dict[str, object]] = []
    for vocab_size in vocab_sizes:
        start = time.perf_counter()
        ours = train_tokenizer(texts, vocab_size, progress=False)
        ours_train = time.perf_counter() - start
        start = time.perf_counter()
        train_plain_tokenizers(texts, vocab_size)
        plain_train = time.perf_counter() - start
        start = time.perf_counter()
        Tokenizer.from_str(ours.to_str())
        load = time.perf_counter() - start
        print(
            f"== vocab {vocab_size} (encode path: {'tiktoken' if ours.tiktoken_encoding else 'tokenizers'})"
        )
        print(f"train   lmforge.train_tokenizer      {ours_train:7.2f} s")
        print(
            f"train   tokenizers BpeTrainer (GPT-2) {plain_train:7.2f} s   lmforge/tokenizers = {ours_train / plain_train:.2f}x"
        )

        print(f"        of which loading the result (merge-order check, tiktoken build) {load:.2f} s")

        with tempfile.TemporaryDirectory() as folder:
            path = ours.save(Path(folder) / "tokenizer.json")
            hf = tokenizers.Tokenizer.from_file(str(path))
            encoding = tiktoken_from_file(path)
        assert encoding.encode_ordinary_batch(texts[:50]) == ours.encode_batch(texts[:50])

        encoders = encode_runs(texts, ours, hf, encoding, threads)
        row: dict[str, object] = {
            "vocab_size": vocab_size,
            "train_s": {"lmforge": ours_train, "tokenizers": plain_train},
            "load_s": load,
        }
        for mode, runs in encoders.items():
            speeds = {name: mb / seconds for name, seconds in best_times(runs, repeat).items()}
            lmforge_speed, tokenizers_speed, tiktoken_speed = speeds.values()
            for name, speed in speeds.items():
                print(f"encode  {name:34s} {speed:7.2f} MB/s   ({mode})")
            print(
                f"        lmforge/tokenizers = {lmforge_speed / tokenizers_speed:.2f}x, "
                f"lmforge/tiktoken = {lmforge_speed / tiktoken_speed:.2f}x"
            )
            row[mode] = speeds
        num_tokens = sum(map(len, ours.encode_batch(texts)))
        print(f"compression: {num_bytes / num_tokens:.2f} bytes per token\n")
        row["bytes_per_token"] = num_bytes / num_tokens
        results.append(row)

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        machine = {"cpu": cpu_name(), "threads": threads, "python": platform.python_version()}
        args.json.write_text(json.dumps({"machine": machine, "megabytes": mb, "results": results}, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
