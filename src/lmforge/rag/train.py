"""``lmforge rag train-retriever``: a dense retriever trained on the knowledge base's own text.

    report = train_retriever("runs/kb", "runs/retriever", encoder="runs/bert/checkpoint", steps=200)
    print(report["before"]["dense"], report["after"]["dense"])   # recall@k, MRR, nDCG@10

With no (question, passage) pairs of the user's, pairs are drawn from the knowledge base
(:func:`lmforge.rag.evaluate.sampled_questions`): a few words of a chunk's sentence ask
for that chunk. The questions are split by a fixed seed: 80% train the encoder
(:class:`lmforge.train.contrastive.ContrastiveStage`, in-batch negatives, through the
one training loop), the other 20% measure dense retrieval over the whole knowledge base
before and after, with the same questions. As in DPR's own evaluation, a held-out
question is new, while its passage may have been trained on with other questions. The trained
encoder is a checkpoint that ``--encoder`` accepts (``lmforge rag index``, ``lmforge
embed``); index again with it, since its vectors differ from the old encoder's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmforge.embed import EMBEDDER_SETTINGS, Embedder
from lmforge.embed import load as load_embedder
from lmforge.errors import InputError
from lmforge.files import write_json_atomic
from lmforge.rag.evaluate import draw_questions, evaluate_retrieval
from lmforge.rag.retrieve import Retriever
from lmforge.rag.store import KnowledgeBase


def dense_figures(kb: KnowledgeBase, embedder: Embedder, questions: list) -> dict:
    """Dense retrieval's figures for ``questions`` over ``kb``, its chunks embedded by ``embedder``."""
    vectors = embedder.encode([c.text for c in kb.chunks])
    return evaluate_retrieval(Retriever(kb, embedder, vectors=vectors), questions, ("dense",))["dense"]


def train_retriever(kb_path: str | Path, out: str | Path, encoder: str = "all-minilm-l6-v2", steps: int = 200,
                    batch_size: int = 32, lr: float = 5e-5, questions_per_chunk: int = 2, temperature: float = 0.05,
                    seed: int = 0, progress: bool = True) -> dict:
    """Train ``encoder`` on pairs drawn from the knowledge base; returns {"before", "after", "checkpoint", ...}."""
    from lmforge.train import TrainConfig, fit
    from lmforge.train.contrastive import ContrastiveStage

    kb = KnowledgeBase(kb_path)
    if len(kb) < 10:
        raise InputError(f"{kb_path}: {len(kb)} chunks; training a retriever needs at least 10")
    drawn = draw_questions(kb, count=len(kb) * questions_per_chunk, seed=seed, per_chunk=questions_per_chunk)
    order = np.random.default_rng(seed).permutation(len(drawn))
    held_out = max(1, len(drawn) // 5)
    test = [drawn[i][0] for i in order[:held_out]]
    train_pairs = [drawn[i] for i in order[held_out:]]
    if len(train_pairs) < 2 or not test:
        raise InputError(f"{kb_path}: too few chunks with sentences to draw training questions from")

    embedder = load_embedder(encoder)  # its model is the one trained (from fp32 weights)
    before = dense_figures(kb, embedder, test)
    settings = {"pooling": embedder.pooling, "normalize": embedder.normalize, "max_tokens": embedder.max_tokens}
    pairs = [(embedder.tokenize([q.text])[0], embedder.tokenize([kb.chunks[row].text])[0]) for q, row in train_pairs]
    config = TrainConfig(out_dir=str(out), batch_size=batch_size, seq_len=settings["max_tokens"], max_steps=steps,
                         lr=lr, warmup_steps=max(1, steps // 10), weight_decay=0.01, eval_every=0, save_every=steps,
                         log_every=max(1, steps // 20), dtype="fp32", progress=progress, seed=seed)
    result = fit(embedder.model, ContrastiveStage(pairs, seed, temperature, settings["pooling"]), config,
                 tokenizer=embedder.tokenizer)
    write_json_atomic(result.checkpoint / EMBEDDER_SETTINGS, settings)

    after = dense_figures(kb, load_embedder(result.checkpoint), test)  # the checkpoint as --encoder would load it
    report = {"encoder": encoder, "checkpoint": str(result.checkpoint), "train_pairs": len(pairs),
              "test_questions": len(test), "steps": result.steps, "before": before, "after": after}
    write_json_atomic(Path(out) / "retriever_report.json", report)
    return report
