"""Data: raw inputs -> clean, deduplicated train/val text -> packed token shards.

manifest = prepare_data(["builtin"], Path("runs/data"), DataConfig())
texts = iter_prepared(Path("runs/data"), "train")
meta = write_shards(Path("runs/data"), tokenizer, Path("runs/shards"))
tokens = load_shard(Path("runs/shards"), "train")   # numpy memmap
"""

from lmforge.data.builtin import Docstring, iter_builtin, stdlib_docstrings
from lmforge.data.clean import clean_text, drop_reason, junk_ratio, split_into_chunks
from lmforge.data.dedup import Deduplicator, Duplicate, MinHasher, lsh_bands
from lmforge.data.prepare import (
    DataConfig,
    iter_prepared,
    iter_prepared_records,
    prepare_data,
    read_manifest,
    split_of,
)
from lmforge.data.shards import TokenShard, load_shard, read_meta, token_dtype, write_shards
from lmforge.data.sources import Document, ReadErrors, iter_documents

__all__ = [
    "DataConfig",
    "Deduplicator",
    "Docstring",
    "Document",
    "Duplicate",
    "MinHasher",
    "ReadErrors",
    "TokenShard",
    "clean_text",
    "drop_reason",
    "iter_builtin",
    "iter_documents",
    "iter_prepared",
    "iter_prepared_records",
    "junk_ratio",
    "load_shard",
    "lsh_bands",
    "prepare_data",
    "read_manifest",
    "read_meta",
    "split_into_chunks",
    "split_of",
    "stdlib_docstrings",
    "token_dtype",
    "write_shards",
]
