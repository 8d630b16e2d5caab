"""``lmforge rag index``: files in, a knowledge base out; indexing again updates it.

    report = index_paths(["docs/", "notes.md"], "runs/kb")       # all-MiniLM-L6-v2 vectors
    print(report.added, report.kept, report.removed)

Indexing reads every file (:mod:`lmforge.rag.documents`), cuts it into chunks
(:mod:`lmforge.rag.chunk`), embeds the chunks (:mod:`lmforge.embed`) and writes the
knowledge base (:mod:`lmforge.rag.store`). Indexing into an existing knowledge base
updates it: a file whose bytes did not change keeps its chunks without being read again;
a changed file is chunked again and only chunks whose id is new are embedded (an
unchanged paragraph keeps its id, and its vector, wherever it moved); a file no longer
given is dropped with its chunks. The result is the knowledge base a rebuild from scratch
would write (tests/rag/test_rag.py). Vectors from another encoder never mix: a
knowledge base made with one encoder refuses an update with another.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmforge.embed import Embedder
from lmforge.embed import load as load_embedder
from lmforge.errors import InputError
from lmforge.files import holds_output
from lmforge.rag.chunk import chunk_document
from lmforge.rag.documents import file_hash, files_under, read_documents
from lmforge.rag.store import KnowledgeBase, is_knowledge_base, write_knowledge_base

DEFAULT_ENCODER = "all-minilm-l6-v2"


@dataclass
class IndexReport:
    files: int = 0
    files_read: int = 0  # new or changed files, read and chunked
    chunks: int = 0
    added: int = 0  # chunks embedded in this run
    kept: int = 0  # chunks whose vectors came from the previous knowledge base
    removed: int = 0  # chunks of the previous knowledge base no longer there
    ann: bool = False  # an HNSW graph was built for approximate dense search
    seconds: float = 0.0


def encoder_fingerprint(embedder: Embedder) -> str:
    """What identifies an encoder's vectors: its config and the first rows of its token embeddings."""
    model = embedder.model
    config = json.dumps(model.config.to_dict(), sort_keys=True)
    weights = model.embed.weight[:4].detach().float().cpu().numpy().tobytes()
    settings = f"{embedder.pooling}:{embedder.normalize}:{embedder.max_tokens}"
    return hashlib.sha256(config.encode() + weights + settings.encode()).hexdigest()[:16]


@holds_output("out")
def index_paths(paths: list[str | Path], out: str | Path, encoder: str | Embedder = DEFAULT_ENCODER,
                max_tokens: int = 256, overlap: int = 32, batch_size: int = 32, ann: str = "auto",
                progress: bool = True) -> IndexReport:
    """Index ``paths`` (files and folders) into the knowledge base at ``out``, updating it if it exists.
    ``ann``: build an HNSW graph for approximate dense search (:mod:`lmforge.rag.ann`): ``on``, ``off``,
    or ``auto`` (from 50,000 chunks on)."""
    from lmforge.rag.ann import AUTO_CHUNKS

    if ann not in ("auto", "on", "off"):
        raise InputError(f"ann must be auto, on or off, got {ann!r}")
    start, report = time.perf_counter(), IndexReport()
    out = Path(out)
    files = files_under(paths)
    embedder = encoder if isinstance(encoder, Embedder) else load_embedder(encoder)
    name = embedder.name or "embedder"
    fingerprint = encoder_fingerprint(embedder)
    max_tokens = min(max_tokens, embedder.max_tokens - 2)  # room for the encoder's [CLS] and [SEP]
    settings = {"max_tokens": max_tokens, "overlap": overlap}
    previous = KnowledgeBase(out) if is_knowledge_base(out) else None
    if previous is None and out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: exists and is not a knowledge base; choose another --out")
    if previous is not None and previous.meta.get("encoder_fingerprint") != fingerprint:
        raise InputError(f"{out} was indexed with the encoder {previous.meta.get('encoder')!r} (fingerprint "
                         f"{previous.meta.get('encoder_fingerprint')}); this one is {name!r} ({fingerprint}): index "
                         "with the same encoder, or into a new --out")
    # other chunking settings: every file is chunked again (the vectors of equal chunks are still reused)
    same_chunking = previous is not None and {k: previous.meta.get(k) for k in settings} == settings
    old_vectors = {c.id: np.array(previous.vectors[c.row]) for c in previous.chunks} if previous is not None else {}

    def count_tokens(text: str) -> int:
        return len(embedder.tokenize([text])[0]) - 2

    hashes, ordered = {}, []
    for path in tqdm(files, desc="reading", unit="file", disable=not progress):
        key = str(path)
        hashes[key] = file_hash(path)
        if same_chunking and previous.files.get(key) == hashes[key]:
            ordered += [(key, c) for c in previous.chunks_of(key)]
            continue
        report.files_read += 1
        for document in read_documents(path):
            ordered += [(key, c) for c in chunk_document(document, count_tokens, max_tokens, overlap)]
    if not ordered:
        raise InputError(f"nothing to index: {', '.join(map(str, paths))} hold no text")
    ordered.sort(key=lambda pair: (pair[0], pair[1].source, pair[1].start, pair[1].end))
    missing = [c for _, c in ordered if c.id not in old_vectors]
    fresh = embedder.encode([c.text for c in missing], batch_size=batch_size, progress=progress) if missing else None
    new_vectors = {c.id: fresh[i] for i, c in enumerate(missing)}
    vectors = np.stack([new_vectors[c.id] if c.id in new_vectors else old_vectors[c.id] for _, c in ordered])
    meta = {"encoder": name, "encoder_fingerprint": fingerprint, "dim": embedder.dim, **settings}
    report.ann = ann == "on" or (ann == "auto" and len(ordered) >= AUTO_CHUNKS)
    write_knowledge_base(out, meta, hashes, ordered, vectors, ann=report.ann)
    kept_ids = {c.id for _, c in ordered}
    report.files, report.chunks = len(files), len(ordered)
    report.added, report.kept = len(missing), len(ordered) - len(missing)
    report.removed = sum(1 for chunk_id in old_vectors if chunk_id not in kept_ids)
    report.seconds = time.perf_counter() - start
    return report

