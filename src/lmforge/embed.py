"""Sentence embeddings from an encoder: texts in, one unit vector per text out.

    embedder = lmforge.embed.load("all-minilm-l6-v2")        # or any encoder checkpoint / BERT directory
    vectors = embedder.encode(["How do I open a file?", "with open(path) as f: ..."])  # (2, 384)
    vectors[0] @ vectors[1]                                   # cosine similarity

An embedder is an encoder (``ModelConfig.causal=False``: every token sees the whole text)
followed by pooling: the mean of the final hidden states over the text's real tokens
(padding excluded), or the first token's state (``cls``), then scaled to length 1, so a
dot product is a cosine similarity. A sentence-transformers directory says which pooling
and whether to normalize (``modules.json``, ``1_Pooling/config.json``) and how many tokens
it reads (``sentence_bert_config.json``); lmforge follows it, so all-MiniLM-L6-v2 gives
the vectors sentence-transformers gives (tests/model/test_embed.py, within 1e-5).

Texts are encoded in batches of similar length (sorted by token count, the longest first),
so little of each batch is padding; the vectors come back in the order given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lmforge.checkpoint import load_model, load_tokenizer
from lmforge.errors import InputError
from lmforge.files import read_json
from lmforge.interop.packaged import PACKAGED, resolve_model
from lmforge.model import DecoderLM
from lmforge.model.fused import fuse_projections
from lmforge.model.transformer import padding_mask
from lmforge.runtime import Runtime
from lmforge.tokenizer.pretrained import PretrainedTokenizer

POOLINGS = ("mean", "cls")
EMBEDDER_SETTINGS = "embedder.json"  # pooling, normalize, max_tokens of an encoder lmforge trained (rag train-retriever)


@dataclass
class Embedder:
    """An encoder, its tokenizer and how its states become one vector per text."""

    model: DecoderLM
    tokenizer: object
    runtime: Runtime
    pooling: str = "mean"
    normalize: bool = True
    max_tokens: int = 512
    name: str = ""  # what load() was given (a packaged name or a path): how a knowledge base finds it again

    def __post_init__(self) -> None:
        check_encoder(self.model)
        if self.pooling not in POOLINGS:
            raise InputError(f"pooling {self.pooling!r}; choose one of {', '.join(POOLINGS)}")
        self.max_tokens = min(self.max_tokens, self.model.config.max_seq_len)
        if isinstance(self.tokenizer, PretrainedTokenizer):  # lmforge pads and cuts itself (tokenize, _embed)
            self.tokenizer.hf.no_padding()
            self.tokenizer.hf.no_truncation()

    @property
    def dim(self) -> int:
        return self.model.config.dim

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text with the encoder's framing ([CLS] ... [SEP] for BERT; begin-of-text ...
        end-of-text for an lmforge tokenizer), cut to ``max_tokens`` (the last token stays the end mark)."""
        if isinstance(self.tokenizer, PretrainedTokenizer):
            rows = [e.ids for e in self.tokenizer.hf.encode_batch(list(texts), add_special_tokens=True)]
        else:
            rows = [self.tokenizer.encode(text, add_bos=True, add_eos=True) for text in texts]
        return [ids if len(ids) <= self.max_tokens else ids[:self.max_tokens - 1] + ids[-1:] for ids in rows]

    def encode(self, texts: Sequence[str] | str, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """(N, dim) float32 vectors of ``texts`` (one text gives (dim,)), in the order given."""
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        rows = self.tokenize(texts)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        with torch.inference_mode(), self.runtime.autocast(), \
                tqdm(total=len(rows), desc="embedding", unit="text", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                chosen = order[start:start + batch_size]
                out[chosen] = self._embed([rows[i] for i in chosen]).cpu().numpy()
                bar.update(len(chosen))
        return out[0] if single else out

    def _embed(self, rows: list[list[int]]) -> torch.Tensor:
        """(B, dim) fp32 vectors of one batch of token-id rows."""
        ids, attention = pad_rows(rows, self.runtime.device)
        return embed_batch(self.model, ids, attention, self.pooling, self.normalize)


def pad_rows(rows: list[list[int]], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows right-padded with 0 into (B, T) ids and their (B, T) attention mask (1 = token)."""
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        attention[i, :len(row)] = 1
    return ids.to(device), attention.to(device)


def embed_batch(model: DecoderLM, ids: torch.Tensor, attention: torch.Tensor, pooling: str = "mean",
                normalize: bool = True) -> torch.Tensor:
    """(B, dim) fp32 vectors of a padded batch: the encoder's final states pooled over real tokens (mean)
    or the first token's (cls), scaled to length 1 when ``normalize``. Differentiable (training uses it)."""
    hidden = model(ids, mask=padding_mask(attention), return_hidden=True).float()  # (B, T, dim)
    if pooling == "cls":
        vectors = hidden[:, 0]
    else:
        weights = attention[..., None].float()
        vectors = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(vectors, dim=-1) if normalize else vectors


def load(path: str | Path, device: str = "auto", dtype: str = "fp32", pooling: str | None = None,
         normalize: bool | None = None, max_tokens: int | None = None) -> Embedder:
    """An embedder from an encoder checkpoint, a BERT directory (a sentence-transformers folder
    included) or a packaged model's name (``all-minilm-l6-v2``).

    ``pooling`` / ``normalize`` / ``max_tokens`` default to what a sentence-transformers folder
    says, else mean pooling, normalized, the model's context. ``dtype`` defaults to fp32: the
    vectors then match other implementations to about 1e-6; bf16 is faster on CPUs with AMX.
    """
    name = str(path) if str(path) in PACKAGED else str(Path(path).resolve())  # found again from any folder
    path = resolve_model(path)
    runtime = Runtime.resolve(device, dtype)
    model = load_model(path, device=runtime.device).to(runtime.dtype).eval()
    check_encoder(model, path)
    fuse_projections(model)  # q, k, v as one product (no gradients are taken here)
    settings = sentence_transformers_settings(path)
    return Embedder(model, load_tokenizer(path), runtime,
                    pooling=pooling or settings.get("pooling", "mean"),
                    normalize=settings.get("normalize", True) if normalize is None else normalize,
                    max_tokens=max_tokens or settings.get("max_tokens", model.config.max_seq_len), name=name)


def check_encoder(model: DecoderLM, source: str | Path = "this model") -> None:
    if model.config.causal:
        raise InputError(f"{source}: embeddings need an encoder (causal=false: every token sees the whole "
                         "text); this is a causal decoder")


def sentence_transformers_settings(path: Path) -> dict:
    """Pooling, normalization and token limit of a sentence-transformers folder, or of an encoder lmforge
    trained (its ``embedder.json``); {} for another. InputError naming the file for anything damaged."""
    own = path / EMBEDDER_SETTINGS
    if own.is_file():
        return _checked_settings(read_json(own), own)
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return {}
    modules = read_json(modules_file, kind=list)
    if not all(isinstance(m, dict) and isinstance(m.get("type", ""), str) and isinstance(m.get("path", ""), str)
               for m in modules):
        raise InputError(f"{modules_file}: each module is an object with a 'type' and a 'path' (strings)")
    settings: dict = {"normalize": any(m.get("type", "").endswith("Normalize") for m in modules)}
    for module in modules:
        if module.get("type", "").endswith("Pooling"):
            folder = Path(module.get("path", ""))
            if folder.is_absolute() or ".." in folder.parts:
                raise InputError(f"{modules_file}: the pooling module's path {str(folder)!r} leaves the model's folder")
            pooling = read_json(path / folder / "config.json")
            modes = [mode for mode in ("mean", "cls") if pooling.get(f"pooling_mode_{mode}_tokens"
                                                                      if mode == "mean" else "pooling_mode_cls_token")]
            others = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v
                      and k not in ("pooling_mode_mean_tokens", "pooling_mode_cls_token")]
            if others or len(modes) != 1:
                raise InputError(f"{path / folder}: pooling {others or modes} is not supported "
                                 "(lmforge pools by mean or cls)")
            settings["pooling"] = modes[0]
    bert_config = path / "sentence_bert_config.json"
    if bert_config.is_file():
        settings["max_tokens"] = read_json(bert_config).get("max_seq_length")
    return _checked_settings({k: v for k, v in settings.items() if v is not None}, path)


def _checked_settings(settings: dict, where: Path) -> dict:
    """``settings`` when each is what an Embedder takes: pooling mean or cls, normalize true or false,
    max_tokens a whole number from 1."""
    tokens = settings.get("max_tokens")
    if settings.get("pooling", "mean") not in ("mean", "cls") or not isinstance(settings.get("normalize", True), bool) \
            or tokens is not None and not (type(tokens) is int and 1 <= tokens < 2**31):
        raise InputError(f"{where}: pooling must be mean or cls, normalize true or false, max_tokens a whole number "
                         "from 1")
    return settings
