"""Retrieval-augmented generation: documents cut into chunks, embedded, stored, and retrieved.

``index_paths`` builds or updates a knowledge base (``lmforge rag index``); ``KnowledgeBase``
opens one; ``Retriever`` searches it by BM25, dense vectors or both fused (``lmforge rag search``).
Guide: docs/RAG.md.
"""

from lmforge.rag.index import IndexReport, index_paths
from lmforge.rag.retrieve import Hit, Retriever
from lmforge.rag.store import KnowledgeBase

__all__ = ["Hit", "IndexReport", "KnowledgeBase", "Retriever", "index_paths"]
