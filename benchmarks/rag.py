"""Retrieval building blocks against their peers, in one run: sentence embeddings (lmforge.embed
against sentence-transformers, the same all-MiniLM-L6-v2 weights).

    python benchmarks/rag.py                       # 2,000 texts from the language reference, fp32 and bf16
    python benchmarks/rag.py --texts 500 --repeats 3

The texts are paragraphs of the language reference (``pydoc_data.topics``), which every
Python installation has, cut to at most 600 characters: a realistic mix of short and long
passages (most under the model's 256-token limit). Both sides encode the same texts in
batches of ``--batch-size``, sorted by length (both sort), and return unit vectors; the
runs alternate (which side goes first takes turns) and the median of ``--repeats`` is
reported, with the largest difference between the two sides' vectors. bf16: lmforge casts
its weights (``dtype="bf16"``); sentence-transformers loads the model in bf16
(``model_kwargs={"torch_dtype": torch.bfloat16}``); only where the CPU runs bf16 natively.

Still to come here (issue 12): BM25 against bm25s and rank-bm25, query latency at 10k and
100k chunks, recall of hybrid retrieval.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import fast_dtypes, machine  # noqa: E402

MODEL = "all-minilm-l6-v2"


def reference_texts(count: int, max_chars: int = 600) -> list[str]:
    """``count`` paragraphs of the language reference, each at most ``max_chars`` characters."""
    from pydoc_data.topics import topics

    paragraphs = [p.strip() for text in topics.values() for p in text.split("\n\n") if len(p.strip()) > 40]
    if len(paragraphs) < count:
        paragraphs = paragraphs * (count // len(paragraphs) + 1)
    return [p[:max_chars] for p in paragraphs[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=2000, help="how many texts to embed")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per batch, both sides")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (medians reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    from lmforge.embed import load
    from lmforge.interop.packaged import packaged_model_path

    texts = reference_texts(args.texts)
    print(f"machine: {machine()}")
    print(f"{len(texts)} language-reference paragraphs (mean {statistics.mean(map(len, texts)):.0f} characters), "
          f"batch size {args.batch_size}, {args.repeats} repeats")
    rows = []
    for dtype in fast_dtypes():
        ours = load(MODEL, device="cpu", dtype=dtype)
        kwargs = {"model_kwargs": {"torch_dtype": torch.bfloat16}} if dtype == "bf16" else {}
        theirs = SentenceTransformer(str(packaged_model_path(MODEL)), device="cpu", **kwargs)
        sides = {"lmforge": lambda batch, model=ours: model.encode(batch, batch_size=args.batch_size),
                 "sentence-transformers": lambda batch, model=theirs: model.encode(
                     batch, batch_size=args.batch_size, convert_to_numpy=True)}
        for run in sides.values():  # warm-up (kernels, allocator), not timed
            run(texts[:64])
        seconds: dict[str, list[float]] = {name: [] for name in sides}
        vectors = {}
        for repeat in range(args.repeats):
            for name in (list(sides) if repeat % 2 == 0 else list(reversed(sides))):
                start = time.perf_counter()
                vectors[name] = np.asarray(sides[name](texts), dtype=np.float32)
                seconds[name].append(time.perf_counter() - start)
        rate = {name: len(texts) / statistics.median(s) for name, s in seconds.items()}
        difference = float(np.abs(vectors["lmforge"] - vectors["sentence-transformers"]).max())
        cosine = float((vectors["lmforge"] * vectors["sentence-transformers"]).sum(1).min())
        rows.append((dtype, rate["lmforge"], rate["sentence-transformers"], difference, cosine))
        print(f"  {dtype}: lmforge {rate['lmforge']:.1f} texts/s, sentence-transformers "
              f"{rate['sentence-transformers']:.1f} texts/s", flush=True)
    print("\n| dtype | lmforge texts/s | sentence-transformers texts/s | ratio | largest difference | lowest cosine |")
    print("|---|---:|---:|---:|---:|---:|")
    for dtype, ours_rate, theirs_rate, difference, cosine in rows:
        print(f"| {dtype} | {ours_rate:.1f} | {theirs_rate:.1f} | {ours_rate / theirs_rate:.2f}x | "
              f"{difference:.1e} | {cosine:.6f} |")


if __name__ == "__main__":
    main()
