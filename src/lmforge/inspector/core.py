"""Look inside one forward pass: tokens, attention, the residual stream and the next-token distribution.

    from lmforge.inspector import inspect_text
    seen = inspect_text(lm, "The animal didn't cross the street because it was too tired")
    seen.tokens                       # ids, text and byte spans
    seen.attention[layer, head]       # (T, T) weights, each row sums to one over the keys
    seen.query_keys(layer, head, 9)   # q of token 9, every key, the scaled dot products, the softmax
    seen.next_token(9, temperature=0.8, top_p=0.9)   # what the sampler keeps, and what it would pick
    seen.lens_top[layer, position]    # the logit lens: the top guesses read from each layer

The model runs once, unchanged; hooks on its layers record what went through them. Attention weights are
computed from each layer's own queries and keys with the reference formula (``attention_weights``, the eager
path's), whatever backend the model runs, and the model's outputs come from its usual forward.
Everything is returned as NumPy arrays and dataclasses, for a notebook to plot.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lmforge.errors import InputError
from lmforge.infer.beam import beam_search
from lmforge.infer.constrain import token_bytes
from lmforge.infer.generate import autocast_for, generate_tokens
from lmforge.infer.sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    make_generator,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from lmforge.infer.seq2seq import ConditionedDecoder, encode_sources, encode_text
from lmforge.model.attention import attention_scores
from lmforge.model.kv_cache import KVCache

LENS_TOP = 5  # guesses kept per layer and position by the logit lens
CANDIDATES = 20  # candidates listed by the next-token view


@dataclass
class Token:
    """One token of the text: its id, its text, and the bytes of the UTF-8 text it covers ([start, end))."""

    index: int
    id: int
    text: str
    start: int
    end: int
    special: bool = False  # a control token (BOS, <|im_start|>, ...) that covers no bytes of the text


@dataclass
class TokenCount:
    """The notes' token counter: how the text's size reads in tokens."""

    tokens: int
    characters: int
    bytes: int
    words: int

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(1, self.tokens)


@dataclass
class QueryKeys:
    """How one row of attention weights is made: one token's query against every key of one head.

    ``scores`` are q . k / sqrt(d) (``-inf`` where the mask forbids), ``weights`` their softmax, and
    ``output`` = weights @ values, the head's contribution before the output projection."""

    layer: int
    head: int
    position: int
    kv_head: int  # the key/value head this query head shares (GQA/MQA: several query heads per kv head)
    query: np.ndarray  # (D,)
    keys: np.ndarray  # (T, D)
    values: np.ndarray  # (T, D)
    scores: np.ndarray  # (T,)
    weights: np.ndarray  # (T,)
    output: np.ndarray  # (D,)


@dataclass
class Candidate:
    id: int
    text: str
    logit: float  # the model's, before any setting
    probability: float  # softmax of the logits at temperature 1
    final: float  # probability after penalty, temperature, top-k and top-p: what sampling draws from
    kept: bool


@dataclass
class NextToken:
    """The next-token distribution after ``position`` (a masked-LM: the distribution of the token at it) and
    what each decoding setting does to it."""

    position: int
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    candidates: list[Candidate]  # the likeliest after the settings, then by the model's own probability
    kept_ids: np.ndarray  # every token the sampler may draw (greedy: the one it takes)
    kept_mass: float  # the model's own probability of the kept set
    entropy: float  # nats, of the model's distribution at temperature 1
    final_entropy: float  # nats, of what sampling draws from
    greedy: int  # argmax after the repetition penalty
    sampled: int | None  # one draw with ``seed`` (None when greedy)
    seed: int
    beam: list[int]  # the best of ``beams`` beams, ``beam_tokens`` tokens long at most
    greedy_run: list[int]  # greedy's tokens over the same length, to compare with the beam
    probabilities: np.ndarray = field(repr=False)  # (V,) at temperature 1
    final_probabilities: np.ndarray = field(repr=False)  # (V,) what sampling draws from


@dataclass
class CacheStep:
    tokens: int  # positions held after this step
    bytes: int  # bytes those positions take, all layers


@dataclass
class CacheView:
    """The KV cache of a decode that starts from the text: what one token costs and how the cache grows."""

    layers: int
    kv_heads: int
    heads: int
    head_dim: int
    dtype: str
    bytes_per_token_layer: int  # keys and values of one token in one layer
    allocated_bytes: int  # what a static cache of ``max_seq_len`` positions preallocates
    max_positions: int
    steps: list[CacheStep]  # after the prefill, then after each generated token
    per_layer_bytes: list[int]  # at the last step

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_token_layer * self.layers

    @property
    def multi_head_bytes_per_token(self) -> int:
        """What a token would cost with one key/value head per query head (MHA): GQA/MQA's saving."""
        return self.bytes_per_token * self.heads // self.kv_heads


@dataclass
class Inspection:
    """One forward pass over a text, recorded. Arrays are float32; L layers, H query heads, T tokens."""

    model: str
    text: str
    tokens: list[Token]
    count: TokenCount
    config: dict[str, Any]
    attention: np.ndarray  # (L, H, T, T) weights; row i: how token i spreads its attention over the keys
    scores: np.ndarray  # (L, H, T, T) scaled dot products before the softmax (-inf where masked)
    queries: np.ndarray  # (L, H, T, D)
    keys: np.ndarray  # (L, Hkv, T, D)
    values: np.ndarray  # (L, Hkv, T, D)
    predicts: str | None  # what a row of logits says: "next" (token i + 1), "masked" (token i), None: no logits
    logits: np.ndarray | None  # (T, V): the model's output
    lens_top: np.ndarray | None  # (L + 1, T, LENS_TOP) ids of the likeliest tokens read from each layer
    lens_probs: np.ndarray | None  # (L + 1, T, LENS_TOP) their probabilities; row 0 is the embeddings
    residual_norm: np.ndarray  # (L + 1, T) norm of the residual stream entering each layer, and the output
    attention_norm: np.ndarray  # (L, T) norm of what each layer's attention adds to the stream
    ffn_norm: np.ndarray  # (L, T) ... and its feed-forward
    # an encoder-decoder: the tokens above are the decoder's (the target), the arrays its stack's; beside them
    source_tokens: list[Token] | None = None  # the encoder's tokens (the source)
    encoder_attention: np.ndarray | None = None  # (Le, H, S, S) the encoder's self-attention, both ways
    cross_attention: np.ndarray | None = None  # (L, H, T, S) each target token over the encoder's output
    _lm: Any = field(default=None, repr=False)
    _vocab: list[bytes | None] | None = field(default=None, repr=False)
    _memo: dict = field(default_factory=dict, repr=False)  # decodes already run for this text

    @property
    def ids(self) -> list[int]:
        return [t.id for t in self.tokens]

    @property
    def source_ids(self) -> list[int]:
        return [t.id for t in self.source_tokens or []]

    @property
    def num_layers(self) -> int:
        return self.attention.shape[0]

    @property
    def num_heads(self) -> int:
        return self.attention.shape[1]

    def check(self, layer: int | None = None, head: int | None = None, position: int | None = None) -> None:
        """InputError for a layer, head or position that does not exist (the message says which do)."""
        if layer is not None and not 0 <= layer < self.num_layers:
            raise InputError(f"layer {layer} does not exist: the model has layers 0..{self.num_layers - 1}")
        if head is not None and not 0 <= head < self.num_heads:
            raise InputError(f"head {head} does not exist: each layer has heads 0..{self.num_heads - 1}")
        if position is not None and not 0 <= position < len(self.tokens):
            raise InputError(f"position {position} is past the text: it has {len(self.tokens)} tokens, "
                             f"positions 0..{len(self.tokens) - 1}")

    def position(self, position: int | None) -> int:
        """A position as given (negative counts from the end; None is the last token), checked."""
        if position is None:
            position = len(self.tokens) - 1
        elif -len(self.tokens) <= position < 0:
            position += len(self.tokens)
        self.check(position=position)
        return position

    def token_text(self, token_id: int) -> str:
        return piece_text(self._vocab, self._lm.tokenizer, token_id, self.source_tokens is not None)

    def query_keys(self, layer: int, head: int, position: int | None = None) -> QueryKeys:
        """One row of the attention weights worked out: token ``position``'s query against every key."""
        position = self.position(position)
        self.check(layer, head)
        kv_head = head // (self.num_heads // self.keys.shape[1])
        weights = self.attention[layer, head, position]
        values = self.values[layer, kv_head]
        return QueryKeys(layer, head, position, kv_head, self.queries[layer, head, position], self.keys[layer, kv_head],
                         values, self.scores[layer, head, position], weights, weights @ values)

    def next_token(self, position: int | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   repetition_penalty: float = 1.0, seed: int = 0, beams: int = 4, beam_tokens: int = 8,
                   candidates: int = CANDIDATES) -> NextToken:
        """The distribution of the token after ``position`` (a masked-LM encoder: of the token at it) and what
        the sampler does with it, through the sampler's own functions (:mod:`lmforge.infer.sampling`), in
        its order: repetition penalty over the tokens so far, temperature, top-k, top-p. Greedy, a seeded
        draw and (a decoder) beam search each say what they would write next."""
        position = self.position(position)
        if self.predicts is None:
            raise InputError(f"this model has the {self.config['head']!r} head: it gives no token probabilities")
        try:
            config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p,
                                    repetition_penalty=repetition_penalty, seed=seed)
        except ValueError as err:
            raise InputError(str(err)) from err
        if beams < 1 or beam_tokens < 1:
            raise InputError(f"beams and beam_tokens must be at least 1, got {beams} and {beam_tokens}")
        logits = torch.from_numpy(self.logits[position]).float()[None]  # (1, V)
        seen = torch.tensor([self.ids[:position + 1]])
        penalized = apply_repetition_penalty(logits, seen, repetition_penalty)
        if config.greedy:
            final = torch.zeros_like(penalized).scatter(1, penalized.argmax(-1, keepdim=True), 1.0)
        else:
            filtered = top_p_filter(top_k_filter(penalized / temperature, top_k), top_p)
            final = torch.softmax(filtered, dim=-1)
        probs = torch.softmax(logits, dim=-1)[0].numpy()
        final_np = final[0].numpy()
        kept = np.flatnonzero(final_np > 0)
        greedy = int(penalized.argmax())
        sampled = None if config.greedy else int(sample_next(logits, config, make_generator(seed), seen)[0])
        order = sorted(range(len(probs)), key=lambda i: (-final_np[i], -probs[i]))[:candidates] \
            if len(probs) <= 4096 else _ranked(final_np, probs, candidates)
        listed = [Candidate(int(i), self.token_text(int(i)), float(self.logits[position, i]), float(probs[i]),
                            float(final_np[i]), bool(final_np[i] > 0)) for i in order]
        beam, greedy_run = [], []  # a masked-LM fills in a position; it does not write on
        if self.predicts == "next":
            beam, greedy_run = self._decode_views(position, beams, beam_tokens, repetition_penalty)
        return NextToken(position, temperature, top_k, top_p, repetition_penalty, listed, kept,
                         float(probs[kept].sum()), _entropy(probs), _entropy(final_np), greedy, sampled, seed,
                         beam, greedy_run, probs, final_np)

    def _decode_views(self, position: int, beams: int, length: int, penalty: float) -> tuple[list[int], list[int]]:
        """Beam search's and greedy's tokens after ``position`` (kept: a sampler setting changed on the page
        does not decode again)."""
        key = ("decode", position, beams, length, penalty)
        if key not in self._memo:
            lm, prefix = self._lm, self.ids[:position + 1]
            length = min(length, lm.model.config.max_seq_len - len(prefix))
            if length < 1:
                return [], []
            config = SamplingConfig(max_new_tokens=length, temperature=0, num_beams=beams, repetition_penalty=penalty)
            greedy = dataclasses.replace(config, num_beams=1)
            if self.source_tokens is None:
                beam = beam_search(lm.model, prefix, config, lm.runtime).tokens
                self._memo[key] = beam, list(lm.new_tokens(prefix, greedy))
            else:  # the decoder bound to the encoded source: a causal LM over the target
                decoder = ConditionedDecoder(lm.model, *encode_sources(lm.model, [self.source_ids], lm.runtime))
                self._memo[key] = (beam_search(decoder, prefix, config, lm.runtime).tokens,
                                   list(generate_tokens(decoder, prefix, greedy, lm.runtime)))
        return self._memo[key]

    def kv_cache(self, steps: int = 16) -> CacheView:
        """Run a KV-cached greedy decode from the text for ``steps`` tokens and measure the cache after the
        prefill and each step: the bytes its tensors hold (:class:`lmforge.model.kv_cache.KVCache`, the object
        the model writes), per layer and in all."""
        if steps < 0:
            raise InputError(f"steps must be >= 0, got {steps}")
        if not self.config["causal"]:
            raise InputError("an encoder reads the whole text at once: it keeps no KV cache")
        if self.source_tokens is not None:
            raise InputError("the KV cache view is not drawn for an encoder-decoder yet")
        if ("kv", steps) in self._memo:
            return self._memo["kv", steps]
        model, config = self._lm.model, self._lm.model.config
        steps = min(steps, config.max_seq_len - len(self.tokens))
        cache = KVCache.for_model(model, 1, max_len=len(self.tokens) + steps)
        ids = torch.tensor([self.ids], device=cache.keys[0].device)
        record: list[CacheStep] = []

        def used() -> list[int]:
            return [k[:, :, :cache.length].nbytes + v[:, :, :cache.length].nbytes
                    for k, v in zip(cache.keys, cache.values, strict=True)]

        with torch.inference_mode(), autocast_for(model, self._lm.runtime):
            for _ in range(steps + 1):
                logits = model(ids, cache)
                record.append(CacheStep(cache.length, sum(used())))
                ids = logits[:, -1:].argmax(-1)
        per_token_layer = 2 * config.num_kv_heads * config.head_dim * cache.keys[0].element_size()
        view = CacheView(config.num_layers, config.num_kv_heads, config.num_heads, config.head_dim,
                         str(cache.keys[0].dtype).removeprefix("torch."), per_token_layer,
                         per_token_layer * config.num_layers * config.max_seq_len, config.max_seq_len, record, used())
        self._memo["kv", steps] = view
        return view


def _ranked(final: np.ndarray, probs: np.ndarray, count: int) -> list[int]:
    """The ``count`` ids first by final probability, then by the model's (a partial sort of a big vocabulary)."""
    pool = np.union1d(np.argpartition(-final, count)[:count], np.argpartition(-probs, count)[:count])
    return sorted(pool.tolist(), key=lambda i: (-final[i], -probs[i]))[:count]


def _entropy(p: np.ndarray) -> float:
    nonzero = p[p > 0].astype(np.float64)
    return float(-(nonzero * np.log(nonzero)).sum()) + 0.0  # one certain token: 0.0, not -0.0


def piece_text(vocab: list[bytes | None] | None, tokenizer: Any, token_id: int, sentinels: bool = False) -> str:
    """A token as text: its bytes decoded (a part of a character as ``\\xNN``), or a special token's name. An id
    past the tokenizer's vocabulary (``vocab`` has the model's) is, with ``sentinels`` (an encoder-decoder), a
    sentinel of span corruption counted down from the last id (``<extra_id_0>`` the last); else an unused row."""
    raw = vocab[token_id] if vocab is not None and token_id < len(vocab) else None
    if raw is not None:
        return raw.decode("utf-8", errors="backslashreplace")
    own = getattr(tokenizer, "vocab_size", None)
    if isinstance(own, int) and token_id >= own and vocab is not None:
        return f"<extra_id_{len(vocab) - 1 - token_id}>" if sentinels else f"<unused id {token_id}>"
    return tokenizer.decode([token_id])


def load_inspectable(path: Any, device: str = "auto", dtype: str = "auto") -> Any:
    """A model to inspect: one that generates (:func:`lmforge.load`), else an encoder with its framing
    (:func:`lmforge.embed.load`: BERT, all-MiniLM, an encoder pretrained with masked tokens)."""
    from lmforge.api import load
    from lmforge.embed import load as load_encoder

    try:
        return load(path, device=device, dtype=dtype)
    except InputError as refused:
        try:
            return load_encoder(path, device=device, dtype="fp32" if dtype == "auto" else dtype)
        except InputError:
            raise refused from None


def check_inspectable(lm: Any) -> None:
    """InputError unless ``lm`` holds a model whose layers the inspector can read: a decoder, an encoder or an
    encoder-decoder loaded in this process."""
    model = getattr(lm, "model", None)
    if model is None or not (hasattr(model, "blocks") or hasattr(model, "decoder")):
        raise InputError("the inspector reads a model loaded in this process (lmforge.load); an endpoint "
                         "behind a URL does not return its attention weights or hidden states")


def predicts(model: Any) -> str | None:
    """What the model's token logits say at a position: "next" (a decoder: the token after it), "masked" (a
    masked-LM encoder: the token there), or None (no token logits: an embedder, a reward model)."""
    if model.config.head in ("lm", "lm+value"):
        return "next" if model.config.causal else "masked"
    return "masked" if model.config.head.startswith("mlm") else None


def tokenize(lm: Any, text: str, vocab: list[bytes | None] | None, add_bos: bool = True) -> list[Token]:
    """The text's tokens as the model reads them, with the byte span of the text each covers: a decoder's
    prompt (with BOS when its tokenizer adds one), an encoder's framing ([CLS] ... [SEP]). Without a byte
    vocabulary (WordPiece), the spans come from the tokenizer's own character offsets."""
    if callable(getattr(lm, "tokenize", None)):  # an embedder (lmforge.embed.Embedder): its framing
        ids = lm.tokenize([text])[0]
    else:
        ids = lm.encode_prompt(text) if add_bos else lm.tokenizer.encode(text)
    if vocab is None:
        return _offset_tokens(lm.tokenizer, text, ids)
    return tokens_of(ids, vocab, lm.tokenizer, lm.model.config.is_encoder_decoder)


def tokens_of(ids: list[int], vocab: list[bytes | None] | None, tokenizer: Any, sentinels: bool = False
              ) -> list[Token]:
    """Tokens of ``ids`` with the byte spans their pieces take one after another (special tokens: none);
    ``sentinels`` as in :func:`piece_text`."""
    tokens, offset = [], 0
    for index, token_id in enumerate(ids):
        raw = vocab[token_id] if vocab is not None and token_id < len(vocab) else None
        size = 0 if raw is None else len(raw)
        tokens.append(Token(index, token_id, piece_text(vocab, tokenizer, token_id, sentinels), offset,
                            offset + size, raw is None))
        offset += size
    return tokens


def _offset_tokens(tokenizer: Any, text: str, ids: list[int]) -> list[Token]:
    """Tokens with spans from a Hugging Face tokenizer's character offsets: the text's own ids found inside
    ``ids``; the others (its framing) are special tokens."""
    encoding = tokenizer.hf.encode(text, add_special_tokens=False)
    own, count = list(encoding.ids), len(encoding.ids)
    start = next((i for i in range(len(ids) - count + 1) if ids[i:i + count] == own), None)
    if start is None:
        raise InputError("the inspector could not place this tokenizer's tokens in the text")
    to_byte = [0]
    for char in text:
        to_byte.append(to_byte[-1] + len(char.encode("utf-8")))
    tokens = []
    for index, token_id in enumerate(ids):
        if start <= index < start + count:
            low, high = encoding.offsets[index - start]
            tokens.append(Token(index, token_id, text[low:high], to_byte[low], to_byte[high]))
        else:
            at = to_byte[-1] if index >= start + count else 0
            tokens.append(Token(index, token_id, tokenizer.decode([token_id]), at, at, True))
    return tokens


class _Recorder:
    """Hooks on one stack's blocks, recording as the model runs: each layer's queries, keys, values and masked
    scaled dot products, what its attention and feed-forward add, the residual stream entering each layer and
    leaving the last, and (a decoder of an encoder-decoder) the cross-attention's scores."""

    def __init__(self, blocks: Any):
        self.q, self.k, self.v, self.scores, self.cross = [], [], [], [], []
        self.attn, self.ffn, self.stream = [], [], []
        self.hooks = [blocks[0].register_forward_pre_hook(lambda _, args: self.stream.append(args[0][0]))]
        for block in blocks:
            self.hooks += [block.attn.register_forward_pre_hook(self._attention),
                           block.attn.register_forward_hook(lambda _, __, out: self.attn.append(out[0])),
                           block.ffn.register_forward_hook(lambda _, __, out: self.ffn.append(out[0])),
                           block.register_forward_hook(lambda _, __, out: self.stream.append(out[0]))]
            if hasattr(block, "cross_attn"):
                self.hooks.append(block.cross_attn.register_forward_pre_hook(self._cross))

    def _attention(self, module: Any, args: tuple) -> None:
        x, _, rotary, mask = (*args, None, None, None)[:4]
        q, k, v = module.project(x, rotary)
        self.q.append(q[0])
        self.k.append(k[0])
        self.v.append(v[0])
        self.scores.append(attention_scores(q, k, mask, module.causal)[0])

    def _cross(self, module: Any, args: tuple) -> None:
        x, (keys, _), mask = (*args, None)[:3]
        self.cross.append(attention_scores(module.queries(x), keys, mask, causal=False)[0])

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def array(self, name: str) -> np.ndarray:
        return torch.stack(getattr(self, name)).float().cpu().numpy()


def inspect_text(lm: Any, text: str, name: str = "model", add_bos: bool = True,
                 max_tokens: int | None = None, target: str | None = None, reply_tokens: int = 16) -> Inspection:
    """Run ``lm`` once over ``text`` and record what each layer saw. ``lm``: a :class:`lmforge.api.LanguageModel`
    (a decoder, an encoder-decoder) or an encoder (:class:`lmforge.embed.Embedder`). ``add_bos``: start with the
    tokenizer's BOS as prompts do; ``max_tokens``: refuse longer texts.

    An encoder-decoder reads ``text`` as its source, and its decoder is inspected over the start token and
    ``target`` (default: its own greedy reply, ``reply_tokens`` at most); the encoder's and the cross
    attention come beside the decoder's."""
    check_inspectable(lm)
    if not text:
        raise InputError("give some text to inspect")
    model = lm.model
    config = model.config
    try:
        vocab = token_bytes(lm.tokenizer, config.vocab_size)
    except InputError:  # not byte-level (BERT's WordPiece): pieces by decoding, spans by offsets
        vocab = None
    tokens = tokenize(lm, text, vocab, add_bos)
    limit = min(config.max_seq_len, max_tokens or config.max_seq_len)
    if len(tokens) > limit:
        reader = "the model reads" if limit == config.max_seq_len else "the inspector here reads"
        raise InputError(f"the text is {len(tokens)} tokens; {reader} at most {limit}")
    seq2seq, reads = config.is_encoder_decoder, predicts(model)
    source = None
    if seq2seq:
        source, tokens = tokens, tokens_of(_target_ids(lm, [t.id for t in tokens], target, reply_tokens, limit),
                                           vocab, lm.tokenizer, sentinels=True)
    device = next(model.parameters()).device
    recorder = _Recorder(model.decoder.blocks if seq2seq else model.blocks)
    encoder = _Recorder(model.encoder.blocks) if seq2seq else None
    ids = torch.tensor([[t.id for t in tokens]], device=device)
    try:
        with torch.inference_mode(), autocast_for(model, lm.runtime):
            if seq2seq:
                memory = model.encode(torch.tensor([[t.id for t in source]], device=device))
                hidden = model.decode(ids, memory, return_hidden=True)[0]

                def read_out(stream: torch.Tensor) -> torch.Tensor:
                    return model.lm_head(model.decoder.norm(stream))
            else:
                hidden = model(ids, return_hidden=True)[0]

                def read_out(stream: torch.Tensor) -> torch.Tensor:
                    return model.logits(model.norm(stream))
            logits = (model.lm_head(hidden) if seq2seq else model.logits(hidden)) if reads else None
            lens_top, lens_probs = [], []
            for stream in recorder.stream if reads else []:  # the logit lens: each layer's stream, read out
                probs = torch.softmax(read_out(stream).float(), dim=-1)
                top = probs.topk(min(LENS_TOP, probs.shape[-1]), dim=-1)
                lens_top.append(top.indices)
                lens_probs.append(top.values)
    finally:
        recorder.remove()
        if encoder is not None:
            encoder.remove()

    scores = recorder.array("scores")
    described = {"layers": len(recorder.scores), "heads": config.num_heads, "kv_heads": config.num_kv_heads,
                 "head_dim": config.head_dim, "dim": config.dim, "vocab_size": config.vocab_size,
                 "max_seq_len": config.max_seq_len, "norm_position": config.norm_position,
                 "causal": config.causal, "head": config.head, "encoder_decoder": seq2seq}
    if seq2seq:
        described["encoder_layers"] = len(encoder.scores)
    return Inspection(
        model=name, text=text, tokens=tokens,
        count=TokenCount(len(source or tokens), len(text), len(text.encode()), len(text.split())),
        config=described, attention=_softmax(scores), scores=scores, queries=recorder.array("q"),
        keys=recorder.array("k"), values=recorder.array("v"), predicts=reads,
        logits=None if logits is None else logits.float().cpu().numpy(),
        lens_top=torch.stack(lens_top).cpu().numpy() if reads else None,
        lens_probs=torch.stack(lens_probs).float().cpu().numpy() if reads else None,
        residual_norm=torch.stack(recorder.stream).float().norm(dim=-1).cpu().numpy(),
        attention_norm=_norms(recorder.attn), ffn_norm=_norms(recorder.ffn), source_tokens=source,
        encoder_attention=_softmax(encoder.array("scores")) if seq2seq else None,
        cross_attention=_softmax(recorder.array("cross")) if seq2seq else None, _lm=lm, _vocab=vocab)


def _target_ids(lm: Any, source: list[int], target: str | None, reply_tokens: int, limit: int) -> list[int]:
    """An encoder-decoder's decoder input: its start token, then ``target``'s tokens or its own greedy reply."""
    start = lm.model.config.decoder_start_id
    if target is not None:
        ids = [start, *encode_text(lm.tokenizer, lm.model, target)]  # <extra_id_i> as the sentinel ids
    else:
        ids = [start, *lm.new_tokens(source, lm.sampling_config(max_new_tokens=reply_tokens, temperature=0))]
    if len(ids) > limit:
        raise InputError(f"the target is {len(ids)} tokens; the inspector here reads at most {limit}")
    return ids


def _norms(outputs: list[torch.Tensor]) -> np.ndarray:
    return torch.stack(outputs).float().norm(dim=-1).cpu().numpy()


def _softmax(scores: np.ndarray) -> np.ndarray:
    """Row softmax of (..., Tk) scores holding -inf, in float32 (as ``attention_weights`` computes it); a row
    with no key to see (all -inf) is zeros."""
    return np.nan_to_num(torch.softmax(torch.from_numpy(scores), dim=-1).numpy(), nan=0.0)

