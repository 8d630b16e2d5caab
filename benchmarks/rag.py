"""Retrieval building blocks against their peers, in one run: sentence embeddings (lmforge.embed
against sentence-transformers, the same all-MiniLM-L6-v2 weights), BM25 (lmforge's index against
bm25s and rank-bm25 on the same words), and query latency at 10k and 100k chunks.

    python benchmarks/rag.py                       # everything
    python benchmarks/rag.py --only embed --texts 500
    python benchmarks/rag.py --only bm25 latency --sizes 10000   # pip install rank-bm25 for its column
    python benchmarks/rag.py --only recall --questions 200
    python benchmarks/rag.py --only ann --ann-texts 20000

The texts are paragraphs of the language reference (``pydoc_data.topics``), which every
Python installation has, cut to at most 600 characters: a realistic mix of short and long
passages (most under the model's 256-token limit). Both sides encode the same texts in
batches of ``--batch-size``, sorted by length (both sort), and return unit vectors; the
runs alternate (which side goes first takes turns) and the median of ``--repeats`` is
reported, with the largest difference between the two sides' vectors. bf16: lmforge casts
its weights (``dtype="bf16"``); sentence-transformers loads the model in bf16
(``model_kwargs={"torch_dtype": torch.bfloat16}``); only where the CPU runs bf16 natively.

BM25: the chunks are paragraphs of the standard library's docstrings and the language
reference (``--sizes`` of them, repeated when the text runs out), the queries 200 runs of
3-5 consecutive words drawn from them. All three score the same words (lmforge's
:func:`~lmforge.rag.bm25.bm25_tokens`): lmforge (bm25s's Lucene BM25 behind
``Retriever.bm25_scores`` and a top-k), bm25s called directly (``BM25.retrieve``, the same
variant: the scores must agree), rank-bm25's ``BM25Okapi`` (another IDF, so its top 10 is
compared by overlap; it scores in Python, so it gets 20 queries). Build: seconds to index.

ANN: HNSW against exact dense search on ``--ann-texts`` real embedded paragraphs: recall@10
of the graph's top 10 against the exact one, and search time per query, per ``ef_search``.

Recall: recall@1/5/10, MRR and nDCG@10 of bm25, dense and hybrid over the whole language
reference, on the built-in hand-written questions (``langref``) and on ``--questions`` drawn ones.

Latency: per query, p50 and p95 over 200 queries, of lmforge's three methods on a
knowledge base of ``--sizes`` chunks with random unit vectors (the dense search cost does
not depend on what the vectors mean; the query is embedded for real).

Recall: a knowledge base of every language-reference topic (one Markdown file each, indexed
with all-MiniLM-L6-v2), 200 questions drawn from it by ``lmforge rag eval``'s sampler (six
consecutive words of a chunk's sentence, the chunk's file relevant); recall@k, MRR and
nDCG@10 of bm25, dense and hybrid side by side. Drawn questions share words with their
answers, which favours BM25: a hand-written question set would tell more.
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


def corpus_chunks(count: int) -> list[str]:
    """``count`` paragraphs of stdlib docstrings and the language reference (repeated if needed)."""
    from lmforge.data.builtin import stdlib_docstrings

    paragraphs = [p.strip() for d in stdlib_docstrings() for p in d.text.split("\n\n") if len(p.split()) >= 8]
    paragraphs += reference_texts(5000)
    return [paragraphs[i % len(paragraphs)] for i in range(count)]


def make_queries(chunks: list[str], count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    queries = []
    while len(queries) < count:
        words = chunks[int(rng.integers(len(chunks)))].split()
        size = int(rng.integers(3, 6))
        if len(words) > size:
            start = int(rng.integers(len(words) - size))
            queries.append(" ".join(words[start:start + size]))
    return queries


def bench_bm25(sizes: list[int]) -> None:
    import bm25s

    from lmforge.rag.bm25 import bm25_tokens, build_bm25
    from lmforge.rag.retrieve import _top

    try:
        from rank_bm25 import BM25Okapi
    except ImportError:
        BM25Okapi = None
        print("rank-bm25 is not installed (pip install rank-bm25): its column stays empty")
    print("\n| chunks | side | build s | queries/s | agreement with lmforge |")
    print("|---:|---|---:|---:|---|")
    for size in sizes:
        chunks = corpus_chunks(size)
        queries = make_queries(chunks, 200)
        start = time.perf_counter()
        ours = build_bm25(chunks)
        ours_build = time.perf_counter() - start
        start = time.perf_counter()
        our_top = [_top(np.asarray(ours.get_scores(bm25_tokens(q)), dtype=np.float64), 10) for q in queries]
        ours_qps = len(queries) / (time.perf_counter() - start)
        print(f"| {size} | lmforge (bm25s Lucene behind Retriever) | {ours_build:.2f} | {ours_qps:.0f} | |")
        tokens = [bm25_tokens(c) or [""] for c in chunks]
        start = time.perf_counter()
        direct = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
        direct.index(tokens, show_progress=False)
        direct_build = time.perf_counter() - start
        start = time.perf_counter()
        found, scores = direct.retrieve([bm25_tokens(q) for q in queries], k=10, show_progress=False)
        direct_qps = len(queries) / (time.perf_counter() - start)
        ours_scores = np.array([np.sort(np.asarray(ours.get_scores(bm25_tokens(q))))[::-1][:10] for q in queries])
        difference = float(np.abs(ours_scores - scores).max())
        print(f"| {size} | bm25s (retrieve, same words) | {direct_build:.2f} | {direct_qps:.0f} | "
              f"top-10 scores differ by at most {difference:.1e} |")
        if BM25Okapi is not None:
            start = time.perf_counter()
            okapi = BM25Okapi(tokens)
            okapi_build = time.perf_counter() - start
            few = queries[:20]
            start = time.perf_counter()
            okapi_top = [np.argsort(-okapi.get_scores(bm25_tokens(q)))[:10] for q in few]
            okapi_qps = len(few) / (time.perf_counter() - start)
            overlap = statistics.mean(len(set(a) & set(b)) / 10 for a, b in zip(okapi_top, our_top))
            print(f"| {size} | rank-bm25 (BM25Okapi, same words, 20 queries) | {okapi_build:.2f} | {okapi_qps:.1f} | "
                  f"top-10 overlap {overlap:.2f} (Okapi IDF) |")


def bench_latency(sizes: list[int]) -> None:
    import tempfile

    from lmforge.embed import load
    from lmforge.rag import KnowledgeBase, Retriever
    from lmforge.rag.chunk import Chunk
    from lmforge.rag.store import write_knowledge_base

    embedder = load(MODEL, device="cpu")
    print("\n| chunks | method | p50 ms | p95 ms |")
    print("|---:|---|---:|---:|")
    for size in sizes:
        chunks = corpus_chunks(size)
        rng = np.random.default_rng(0)
        vectors = rng.standard_normal((size, embedder.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        with tempfile.TemporaryDirectory() as folder:
            rows = [("corpus", Chunk(f"{i:08d}", "corpus", "", 0, len(t), t, 0)) for i, t in enumerate(chunks)]
            write_knowledge_base(Path(folder) / "kb", {"encoder": MODEL}, {"corpus": "-"}, rows, vectors)
            retriever = Retriever(KnowledgeBase(Path(folder) / "kb"), embedder)
            queries = make_queries(chunks, 200, seed=1)
            for method in ("bm25", "dense", "hybrid"):
                retriever.search(queries[0], method=method)  # warm-up
                times = []
                for query in queries:
                    start = time.perf_counter()
                    retriever.search(query, k=10, method=method)
                    times.append((time.perf_counter() - start) * 1000)
                p50, p95 = np.percentile(times, [50, 95])
                print(f"| {size} | {method} | {p50:.1f} | {p95:.1f} |", flush=True)


def bench_ann(texts: int) -> None:
    """HNSW (approximate) against exact dense search on real vectors: ``texts`` distinct paragraphs of
    the stdlib's docstrings and the language reference, embedded by all-MiniLM-L6-v2; 200 queries of a
    few words from them. Per ``ef_search``: recall@10 against the exact top 10, and the search time
    per query (the query's embedding, the same for both, not counted)."""
    from lmforge.embed import load
    from lmforge.rag.ann import HNSWIndex
    from lmforge.rag.retrieve import _top

    chunks = list(dict.fromkeys(corpus_chunks(texts * 2)))[:texts]
    embedder = load(MODEL, device="cpu")
    start = time.perf_counter()
    vectors = embedder.encode(chunks, batch_size=64, progress=False)
    print(f"\nann: {len(chunks)} distinct paragraphs embedded in {time.perf_counter() - start:.0f} s")
    queries = embedder.encode(make_queries(chunks, 200, seed=2), progress=False)
    start = time.perf_counter()
    graph = HNSWIndex.build(vectors)
    print(f"HNSW graph (m 32, ef_construction 128) built in {time.perf_counter() - start:.1f} s")

    def timed(search) -> tuple[list, float, float]:
        found, times = [], []
        for query in queries:
            begin = time.perf_counter()
            found.append(search(query))
            times.append((time.perf_counter() - begin) * 1000)
        p50, p95 = np.percentile(times, [50, 95])
        return found, p50, p95

    exact, p50, p95 = timed(lambda q: _top(vectors @ q, 10))
    print("\n| search | recall@10 vs exact | p50 ms | p95 ms |\n|---|---:|---:|---:|")
    print(f"| exact (all {len(chunks)} vectors) | 1.000 | {p50:.2f} | {p95:.2f} |")
    for ef in (16, 32, 64, 128, 256):
        approx, p50, p95 = timed(lambda q, ef=ef: graph.search(q, 10, ef)[0])
        recall = statistics.mean(len(set(a) & set(e)) / 10 for a, e in zip(approx, exact))
        print(f"| hnsw ef_search {ef} | {recall:.3f} | {p50:.2f} | {p95:.2f} |", flush=True)


def bench_recall(questions: int) -> None:
    """Recall of each retriever over the language reference: on the built-in hand-written question set
    (``langref``: questions in a learner's words, which is the comparison that counts) and on questions
    drawn from the chunks themselves (a few of their own words: these flatter BM25)."""
    import tempfile

    from lmforge.rag import KnowledgeBase, Retriever, index_paths
    from lmforge.rag.evaluate import evaluate_retrieval, format_table, read_questions, sampled_questions
    from lmforge.rag.langref import write_topics

    with tempfile.TemporaryDirectory() as folder:
        write_topics(Path(folder) / "pyref")
        report = index_paths([Path(folder) / "pyref"], Path(folder) / "kb", encoder=MODEL, progress=False)
        kb = KnowledgeBase(Path(folder) / "kb")
        print(f"\nrecall: {report.chunks} chunks of {report.files} language-reference topics, indexed in "
              f"{report.seconds:.0f} s")
        retriever = Retriever(kb)
        written = read_questions("langref")
        print("\nhand-written questions (langref):\n" + format_table(evaluate_retrieval(retriever, written),
                                                                       len(written)))
        drawn = sampled_questions(kb, questions, seed=0)
        print("\ndrawn questions:\n" + format_table(evaluate_retrieval(retriever, drawn), len(drawn)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=["embed", "bm25", "latency", "ann", "recall"],
                        default=["embed", "bm25", "latency", "ann", "recall"])
    parser.add_argument("--ann-texts", type=int, default=20000, help="real paragraphs embedded for the ann part")
    parser.add_argument("--questions", type=int, default=200, help="drawn questions for the recall part")
    parser.add_argument("--texts", type=int, default=2000, help="how many texts to embed")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000], help="chunks for bm25 and latency")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per batch, both sides")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (medians reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    if "embed" in args.only:
        bench_embed(args)
    if "bm25" in args.only:
        bench_bm25(args.sizes)
    if "latency" in args.only:
        bench_latency(args.sizes)
    if "ann" in args.only:
        bench_ann(args.ann_texts)
    if "recall" in args.only:
        bench_recall(args.questions)


def bench_embed(args: argparse.Namespace) -> None:
    from sentence_transformers import SentenceTransformer

    from lmforge.embed import load
    from lmforge.interop.packaged import packaged_model_path

    texts = reference_texts(args.texts)
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
