"""The batched engine: many requests of different lengths decoded together.

    engine = Engine(model, max_batch_size=8)
    engine.add(Request(prompt_ids, SamplingConfig(temperature=0.7, seed=1), decode=tokenizer.decode))
    while engine.has_work:
        for output in engine.step():   # RequestOutput: new tokens and text of one request
            ...

Each request owns a slot of the :class:`SlotKVCache` from its admission to its end.
One :meth:`Engine.step` does, in order:

1. **Admission** (continuous batching). Waiting requests take free slots, within
   ``max_prefill_tokens`` new prompt tokens per step (so a long prompt delays the running
   rows by at most one pass); a prompt that could reuse what this step computes waits for
   the next.
2. **Prefix cache.** A slot keeps the tokens whose keys it holds after its request ends.
   A new prompt that begins with tokens some slot holds (the earlier turns of a chat, a
   shared system prompt, few-shot examples) reuses them: in place when that slot is
   free, else copied into a free slot. Only the rest of the prompt is computed.
3. **One forward pass.** With new prompts: a packed pass, the running rows' next tokens
   and the new prompts' tokens as one sequence with no padding between prompts
   (:meth:`SlotKVCache.bind_packed`): admitting requests costs the running rows no extra
   pass, and the products see only real tokens. Without: a plain decode step over slots
   ``0..B-1``, B the running rows' span rounded up to a bucket (1, 2, 4, 8, ...), the
   fixed-shape pass that a compiled step runs (it compiles once per bucket, not once per
   batch size).
4. **Sampling per row**, with the row's own settings and its own random generator
   (seeded per request), so a row's tokens do not depend on what else shares the batch.
   Stop tokens, stop strings, the token limit and constraints end rows independently.

**Speculative decoding.** A request with a drafter (``Request.drafter``: prompt lookup, a
draft model) has its guesses made before a decode step. When some row has guesses, the
step is (B, 1 + k) instead of (B, 1): each row's pending token and its guesses at
positions P..P+k of its slot, causal among themselves, the empty places padding. One pass
thus checks every guess (:func:`lmforge.infer.speculative.verify`): a row keeps the
guesses the model agrees with and the model's own next token, 1 to k + 1 tokens a step,
each checked for stops and limits like a sampled one. The keys of rejected guesses stay
past the slot's length, where the next pass overwrites them. The step keeps fixed shapes,
so a compiled step runs it (one more graph per bucket). Steps that admit new prompts
decode one token a row.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from lmforge.infer.generate import autocast_for, eval_mode
from lmforge.infer.request import Completion, Request, RequestOutput, TokenLogprob
from lmforge.infer.sampling import apply_presence_frequency_penalty, apply_repetition_penalty, draw
from lmforge.infer.slot_cache import KEY_BLOCK, Segment, SlotKVCache, attention_mask, block_room, key_count
from lmforge.infer.speculative import check_speculative, verify
from lmforge.infer.stream import StopStrings, TextStream
from lmforge.model import DecoderLM
from lmforge.runtime import Runtime

# slot index -> (a speculating row's guesses, the distributions they were drawn from or None)
Drafts = dict[int, tuple[list[int], torch.Tensor | None]]


@dataclass
class _Slot:
    index: int
    tokens: list[int] = field(default_factory=list)  # the tokens whose keys/values this slot holds, in order
    computed: int = 0  # how many of them are in the cache already (fewer while a prefill is assembled)
    sequence: _Sequence | None = None  # the request using it; None when free
    last_used: float = 0.0


@dataclass
class _Sequence:
    """A request's state inside the engine."""

    request: Request
    stop_ids: set[int]
    generator: torch.Generator
    slot: _Slot | None = None
    generated: list[int] = field(default_factory=list)  # sampled tokens, a stop token included
    pending: int | None = None  # the last sampled token, not yet fed to the model
    cached_tokens: int = 0
    text: TextStream | None = None
    stops: StopStrings | None = None
    counts: torch.Tensor | None = None  # (V,) how often each token was generated (presence/frequency)
    source: list[int] | None = None  # an encoder-decoder's source (the request's prompt)

    @property
    def id(self) -> str:
        return self.request.request_id


@dataclass
class EngineStats:
    """Counters since the engine started (for /metrics)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    generated_tokens: int = 0
    prefix_queries: int = 0  # admissions that looked up the prefix cache
    prefix_hits: int = 0  # ... and found at least one token
    decode_steps: int = 0
    drafted: int = 0  # tokens guessed by drafters (speculative decoding)
    accepted: int = 0  # ... and kept by the model
    prefill_passes: int = 0  # forward passes that prefilled one or more prompts
    finished: dict[str, int] = field(default_factory=dict)  # by finish reason


def batch_buckets(max_batch_size: int) -> list[int]:
    """Batch sizes the decode step runs at: powers of two below ``max_batch_size``, and it."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch_size]


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if n == 0 or a[0] != b[0]:
        return 0
    if a[:n] == b[:n]:
        return n
    lo, hi = 1, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]: bisect on list slices (C speed)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class Engine:
    """Continuous-batching generation over one model. Not thread-safe: one thread calls it.

    ``context``: positions per slot (default: the model's ``max_seq_len``); a request's
    prompt plus ``max_new_tokens`` must fit. ``decode_step``: a compiled version of the
    model for the one-token steps (:class:`CompiledDecodeStep`); prefills run eagerly, unless it was
    made with ``prefill=True`` (then the packed passes run compiled too). For an encoder-decoder the
    engine makes the step again around its slot decoder (:class:`lmforge.infer.seq2seq.SlotDecoder`),
    with the same options; its packed passes (which also run the encoder) stay eager.
    ``decode_buckets``: the batch sizes decode steps run at (default :func:`batch_buckets`);
    ``[max_batch_size]`` alone pads every step to the full batch: one compiled graph instead
    of one per bucket (a fifth of the compile time at 16 slots), at little cost per step when
    the step reads weights more than it computes, as on CPUs. ``vocab_limit``: the tokenizer's size when the model has more logits than it has
    tokens (padded embedding tables); the ids past it are never sampled.
    """

    def __init__(self, model: DecoderLM, runtime: Runtime | None = None, max_batch_size: int = 8,
                 context: int | None = None, decode_step=None, max_prefill_tokens: int = 2048,
                 prefix_caching: bool = True, vocab_limit: int | None = None,
                 decode_buckets: Sequence[int] | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if not model.config.causal:
            raise ValueError("this model is an encoder (every token sees the whole text): it does not generate")
        self.sources = None  # an encoder-decoder: a request's prompt is its source, the decoder starts afresh
        if model.config.is_encoder_decoder:
            from lmforge.infer.seq2seq import SlotDecoder

            if getattr(decode_step, "prefill", False):
                raise ValueError("an encoder-decoder's packed passes run eagerly: compile its decode steps only "
                                 "(no prefill=True)")
            self.sources, self.start_ids = SlotDecoder(model, max_batch_size), [model.config.decoder_start_id]
            model, prefix_caching = self.sources, False  # every target starts with the same token
            if decode_step is not None:  # the model's compiled step, made again around the engine's decoder
                decode_step = decode_step.around(self.sources)
        self.model, self.runtime, self.decode_step = model, runtime, decode_step
        self.context = min(context or model.config.max_seq_len, model.config.max_seq_len)
        self.cache = SlotKVCache.for_model(model, max_batch_size, self.context)
        self.slots = [_Slot(i) for i in range(max_batch_size)]
        self.decode_buckets = sorted(decode_buckets or batch_buckets(max_batch_size))
        if self.decode_buckets[-1] != max_batch_size or self.decode_buckets[0] < 1:
            raise ValueError(f"decode_buckets must lie in 1..{max_batch_size} and include it, got {decode_buckets}")
        self.max_prefill_tokens, self.prefix_caching = max_prefill_tokens, prefix_caching
        self.vocab_size = model.config.vocab_size
        self.vocab_limit = vocab_limit if vocab_limit is not None and vocab_limit < self.vocab_size else None
        self.device = self.cache.device
        self.waiting: deque[_Sequence] = deque()
        self.running: dict[str, _Sequence] = {}
        self._aborted: list[RequestOutput] = []
        self.stats = EngineStats()

    # ---- the public surface ------------------------------------------------------------------

    @property
    def max_batch_size(self) -> int:
        return len(self.slots)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._aborted)

    def add(self, request: Request) -> None:
        """Queue a request; it joins the batch at the next step with a free slot. Bad requests raise ValueError."""
        self.validate(request)
        if request.request_id in self.running or any(s.id == request.request_id for s in self.waiting):
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        source = None
        if self.sources is not None:  # the encoder reads the prompt; the decoder starts from its start token
            source, request = request.prompt_ids, dataclasses.replace(request, prompt_ids=list(self.start_ids))
        config = request.sampling
        seed = config.seed if config.seed is not None else int(torch.randint(0, 2**62, ()).item())
        sequence = _Sequence(request, set(config.stop_token_ids), torch.Generator(device=self.device).manual_seed(seed))
        if request.decode is not None:
            sequence.text, sequence.stops = TextStream(request.decode), StopStrings(config.stop)
        sequence.source = source
        self.waiting.append(sequence)

    def validate(self, request: Request) -> None:
        """Raise ValueError for a request this engine cannot run (reads only the engine's settings)."""
        if self.sources is not None:  # an encoder-decoder: the prompt is the source; the target is checked below
            source = request.prompt_ids
            if not source:
                raise ValueError("the source is empty: give at least one token")
            if len(source) > self.context:
                raise ValueError(f"the source has {len(source)} tokens; the encoder reads at most {self.context}")
            if min(source) < 0 or max(source) >= self.vocab_size:
                raise ValueError(f"source token ids must be in [0, {self.vocab_size}), got {min(source)}..{max(source)}")
            if request.prompt_logprobs is not None:
                raise ValueError("an encoder-decoder's prompt is its source: the decoder gives it no log-probs")
            request = dataclasses.replace(request, prompt_ids=list(self.start_ids))
        prompt, config = request.prompt_ids, request.sampling
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token (e.g. the BOS token)")
        if len(prompt) + config.max_new_tokens > self.context:
            raise ValueError(f"the prompt has {len(prompt)} tokens; with max_new_tokens={config.max_new_tokens} "
                             f"that exceeds the context of {self.context} tokens")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got {min(prompt)}..{max(prompt)}")
        if request.continuations is not None:
            if not request.continuations or not all(request.continuations):
                raise ValueError("continuations must be a non-empty list of non-empty token lists")
            if len(prompt) + _branch_tokens(request) > self.context:
                raise ValueError(f"the prompt ({len(prompt)} tokens) and its continuations ({_branch_tokens(request)}) "
                                 f"exceed the context of {self.context} tokens")
            if min(map(min, request.continuations)) < 0 or max(map(max, request.continuations)) >= self.vocab_size:
                raise ValueError(f"continuation token ids must be in [0, {self.vocab_size})")
        if request.prompt_logprobs is not None and not 1 <= request.prompt_logprobs_start <= len(prompt):
            raise ValueError(f"prompt_logprobs_start must be in [1, {len(prompt)}] (the prompt's length), "
                             f"got {request.prompt_logprobs_start}")
        if config.num_beams > 1:
            raise ValueError("the batched engine samples; beam search runs on its own (lmforge.infer.beam_search)")
        if config.stop and request.decode is None:
            raise ValueError("stop strings need the request's decode function to read the text")
        if request.drafter is not None:
            check_speculative(config)
            if request.constraint is not None:
                raise ValueError("speculative decoding does not combine with a constraint on the tokens")
            if request.draft_tokens < 1:
                raise ValueError(f"draft_tokens must be at least 1, got {request.draft_tokens}")

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its slot; its last output (reason "abort") comes with the next step."""
        for sequence in self.waiting:
            if sequence.id == request_id:
                self.waiting.remove(sequence)
                break
        else:
            sequence = self.running.get(request_id)
            if sequence is None:
                return False
        self._aborted.append(self._finish(sequence, RequestOutput(request_id, []), "abort"))
        return True

    def clear_prefix_cache(self) -> int:
        """Forget the tokens that free slots hold, so that the next prompts compute every token afresh
        (a benchmark's repeats timed alike, new weights loaded in place). Running requests keep
        theirs. Returns how many cached tokens were forgotten."""
        forgotten = 0
        for slot in self.slots:
            if slot.sequence is None:
                forgotten += slot.computed
                slot.tokens, slot.computed = [], 0
        return forgotten

    def step(self) -> list[RequestOutput]:
        """Admit what fits, run one forward pass (new prompts and one token for every running row, or
        a plain decode step), sample; returns what each request added."""
        outputs, self._aborted = self._aborted, []
        with eval_mode(self.model), torch.inference_mode(), autocast_for(self.model, self.runtime):
            batch = self._admit()
            decoding = {s.slot.index: s for s in self.running.values() if s.pending is not None}
            if batch:
                outputs += self._packed(batch, decoding)
            elif decoding:
                outputs += self._decode(decoding, self._draft(decoding))
        return outputs

    def generate(self, requests: Iterable[Request]) -> list[Completion]:
        """Run ``requests`` to the end (at most ``max_batch_size`` at once); completions in request order."""
        requests = list(requests)
        outputs: dict[str, list[RequestOutput]] = {r.request_id: [] for r in requests}
        if len(outputs) != len(requests):
            raise ValueError("request ids must be unique")
        for request in requests:
            self.add(request)
        while self.has_work:
            for output in self.step():
                if output.request_id in outputs:
                    outputs[output.request_id].append(output)
        return [Completion.join(outputs[r.request_id]) for r in requests]

    def warm_up(self, draft_tokens: int = 0) -> float:
        """Run the decode step once per batch bucket at two cache lengths (padding rows only), so that a
        compiled step compiles now rather than in the first requests; with ``draft_tokens`` k > 0 also
        the speculative steps (B, 1 + k); and a compiled packed pass (:meth:`_packed`) twice, at two
        sizes. Returns the seconds it took."""
        start = time.perf_counter()
        step, packed = self.decode_step or self.model, self._packed_step()
        with eval_mode(self.model), torch.inference_mode(), autocast_for(self.model, self.runtime):
            if packed is not None:  # padding only: every key goes to the scratch column
                rows = len(self._decode_rows({}, least=self._least_packed_rows())[0])
                for new in (3, 5):  # one padding prompt's tokens; the second size runs the first one's graph
                    count = rows + new
                    ids = torch.zeros(1, count, dtype=torch.long, device=self.device)
                    zeros = torch.zeros(count, dtype=torch.long, device=self.device)
                    self.cache.bind_packed(zeros, torch.full_like(zeros, self.cache.scratch),
                                           attention_mask(zeros[:rows, None], KEY_BLOCK),
                                           [Segment(0, rows, count, torch.ones(new, 2, dtype=torch.bool))],
                                           for_compiler=True)
                    packed(ids, self.cache, torch.zeros_like(ids))
            for batch in self.decode_buckets:
                for width in (1, 1 + draft_tokens) if draft_tokens else (1,):
                    ids = torch.zeros(batch, width, dtype=torch.long, device=self.device)
                    positions = torch.zeros_like(ids)  # its own tensor: an input aliasing another is guarded on
                    for kv_len in (2, 3):  # a decode reads at least 2 positions; the second reuses the graph
                        self.cache.bind(torch.full_like(ids, self.cache.scratch), kv_len)
                        step(ids, self.cache, positions=positions, mask=attention_mask(positions, kv_len),
                             **self._memory(batch))
        return time.perf_counter() - start

    def _memory(self, rows: int) -> dict[str, torch.Tensor]:
        """What a decode step over slots 0..rows-1 passes besides tokens, positions and mask: an
        encoder-decoder's memory mask (which source columns each row reads); nothing for a decoder."""
        if self.sources is None:
            return {}
        return {"memory_mask": self.sources.decode_memory_mask(rows, for_compiler=self.decode_step is not None)}

    def _packed_step(self):
        """The compiled packed pass, when the decode step was made to compile it (``prefill=True``)."""
        return self.decode_step.packed if getattr(self.decode_step, "prefill", False) else None

    def _least_packed_rows(self) -> int:
        """The decode rows a compiled packed pass carries at least (padding where none decode): a compiler
        makes sizes 0 and 1 constants, so from 2 up one graph serves every pass."""
        return min(2, len(self.slots))

    def usage(self) -> dict[str, float]:
        """Load figures for monitoring: waiting and running requests, KV positions in use."""
        used = sum(len(s.tokens) for s in self.slots if s.sequence is not None)
        return {"waiting": len(self.waiting), "running": len(self.running),
                "kv_cache_usage": used / (len(self.slots) * self.context)}

    # ---- admission: slots, prefix cache, prefill ------------------------------------------------

    def _admit(self) -> list[tuple[_Sequence, _Slot, int]]:
        """Place waiting requests into free slots, within ``max_prefill_tokens`` new tokens (at least one
        request); a request that could reuse positions this step computes waits for the next step.
        Returns (sequence, slot, reused prompt tokens) for the step's pass."""
        batch, budget = [], self.max_prefill_tokens
        while self.waiting and budget > 0 and any(s.sequence is None for s in self.slots):
            sequence = self.waiting[0]
            slot, reused, source = self._place(sequence.request)
            if batch and self._waits_for(sequence.request, batch, reused):
                break
            self.waiting.popleft()
            self._claim(sequence, slot, reused, source)
            batch.append((sequence, slot, reused))
            budget -= _new_tokens(sequence.request, reused)
        if self.sources is not None and batch:  # an encoder-decoder: the new sources, encoded together
            self.sources.encode([s.index for _, s, _ in batch], [sequence.source for sequence, _, _ in batch])
        return batch

    def cached_prefix(self, prompt_ids: list[int]) -> int:
        """How many leading tokens of ``prompt_ids`` the prefix cache holds now: what a request starting with
        them would reuse (it still computes its last prompt token). For the inspector's KV cache view."""
        if not self.prefix_caching or not prompt_ids:
            return 0
        limit = len(prompt_ids) - 1
        return max((min(common_prefix(s.tokens, prompt_ids), limit, s.computed) for s in self.slots), default=0)

    def _place(self, request: Request) -> tuple[_Slot, int, _Slot | None]:
        """Choose a free slot, how many leading prompt tokens it can reuse, and the slot they are in.

        A prompt must compute at least its last token (its logits start the reply). Without
        a match, the slot is an empty one, else the one unused for longest. A slot claimed
        by the prefill being assembled offers only the positions computed before it.
        """
        free = [s for s in self.slots if s.sequence is None]
        prompt, limit = request.prompt_ids, self._reusable(request)
        if limit <= 0:
            return min(free, key=lambda s: (bool(s.tokens), s.last_used)), 0, None
        matches = {s.index: min(common_prefix(s.tokens, prompt), limit, s.computed) for s in self.slots}
        best = max(self.slots, key=lambda s: (matches[s.index], s.sequence is None))
        reused = matches[best.index]
        if best.sequence is None and reused > 0:
            return best, reused, best
        target = min(free, key=lambda s: (bool(s.tokens), s.last_used))
        return target, reused, best if reused > 0 else None

    def _waits_for(self, request: Request, batch: list[tuple[_Sequence, _Slot, int]], reused: int) -> bool:
        """Whether ``request`` shares enough of its prompt with one being prefilled (a system prompt, a
        question's context) that it should wait one pass and take those positions from the cache."""
        limit, prompt = self._reusable(request), request.prompt_ids
        shared = max(min(common_prefix(s.tokens, prompt), limit) for _, s, _ in batch)
        return shared - reused >= max(8, (len(prompt) - reused) // 4)

    def _reusable(self, request: Request) -> int:
        """How many leading prompt tokens could come from the prefix cache: all but the last, and with
        prompt log-probs none whose logits are needed; 0 without prefix caching."""
        if not self.prefix_caching:
            return 0
        limit = len(request.prompt_ids) - 1
        if request.prompt_logprobs is not None:
            limit = min(limit, request.prompt_logprobs_start - 1)
        return limit

    def _claim(self, sequence: _Sequence, slot: _Slot, reused: int, source: _Slot | None) -> None:
        """Give ``slot`` to ``sequence``, its first ``reused`` positions taken from ``source``'s (copied
        when that is another slot)."""
        request, prompt = sequence.request, sequence.request.prompt_ids
        if self._reusable(request) > 0:
            self.stats.prefix_queries += 1
            self.stats.prefix_hits += reused > 0
        if source is not None and source is not slot:  # the prefix lives in another slot: copy it
            self.cache.copy_prefix(source.index, slot.index, reused)
        slot.sequence, slot.tokens, slot.computed, sequence.slot = sequence, list(prompt), reused, slot
        sequence.cached_tokens = reused
        self.running[sequence.id] = sequence
        self.stats.prompt_tokens += len(prompt)
        self.stats.cached_tokens += reused

    def _packed(self, batch: list[tuple[_Sequence, _Slot, int]], decoding: dict[int, _Sequence]) -> list[RequestOutput]:
        """One forward pass over the new prompts of ``batch`` (each after its reused prefix) and, first,
        one token for every running row in ``decoding`` (slot index -> sequence): all tokens packed
        into one sequence with no padding between prompts (:meth:`SlotKVCache.bind_packed`). Then the
        running rows' next tokens, and each prompt's log-probs and first token.

        A request with ``continuations`` adds them after its prompt, as branches of a tree: a
        branch's tokens sit at positions L, L+1, ... (L the prompt's length) like a plain
        continuation, take cache indices after the prompt's and each other's, and see the prompt and
        their own branch only. So every choice of a question is scored in one row, the context once.
        """
        tokens, slot_of, write, positions = [], [], [], []  # per token of the pass
        decode_mask, compiled = None, self._packed_step()
        if decoding or compiled:  # the decode step's rows first: slots 0..B-1, one token each, as in _decode
            least = self._least_packed_rows() if compiled else 1
            rows = self._decode_rows(decoding, least=least, bucketed=False)
            ids, pos, where = ([row[0] for row in part] for part in rows)
            kv_len = key_count(max(pos) + 1, self.cache.context)  # as _decode reads them
            decode_mask = attention_mask(torch.tensor(pos)[:, None], kv_len).to(self.device)
            tokens += ids
            slot_of += range(len(ids))
            write += where
            positions += pos
        segments, picks = [], []  # per request: which of its tokens' outputs the logits are needed of
        for sequence, slot, reused in batch:
            request, start = sequence.request, len(tokens)
            prompt, n = request.prompt_ids, len(request.prompt_ids) - reused
            tokens += prompt[reused:]
            positions += range(reused, len(prompt))
            write += range(reused, len(prompt))
            if request.continuations is None:
                begin = n - 1 if request.prompt_logprobs is None else max(request.prompt_logprobs_start, 1) - 1 - reused
                picks.append(list(range(begin, n)))
                seen = torch.arange(len(prompt))
                mask = seen[None] <= torch.arange(reused, len(prompt))[:, None]  # causal over the slot's keys
            else:
                upto, branch, chosen, at = list(range(reused, len(prompt))), [0] * n, [], n
                for branch_tokens in request.continuations:  # positions L..; cache indices after the last branch
                    m, index = len(branch_tokens), reused + at
                    tokens += branch_tokens
                    positions += range(len(prompt), len(prompt) + m)
                    write += range(index, index + m)
                    upto += range(index, index + m)
                    branch += [index] * m
                    chosen += [n - 1, *range(at, at + m - 1)]  # each token's logits come from the one before it
                    at += m
                picks.append(chosen)
                seen, upto_t = torch.arange(max(upto) + 1), torch.tensor(upto)[:, None]
                mask = (seen[None] <= upto_t) & ((seen[None] < len(prompt)) | (seen[None] >= torch.tensor(branch)[:, None]))
            segments.append(Segment(slot.index, start, len(tokens), mask))
            slot_of += [slot.index] * (len(tokens) - start)
        padding = shape_bucket(len(tokens)) - len(tokens)  # eight lengths an octave: kernels keep memory per shape
        if padding:  # padding tokens: written to slot 0's scratch column, their outputs unread
            tokens += [0] * padding
            positions += [0] * padding
            write += [self.cache.scratch] * padding
            slot_of += [0] * padding
        self.cache.bind_packed(torch.tensor(slot_of, device=self.device), torch.tensor(write, device=self.device),
                               decode_mask, segments, for_compiler=compiled is not None)
        ids_t, positions_t = torch.tensor([tokens], device=self.device), torch.tensor([positions], device=self.device)
        if compiled:
            hidden = compiled(ids_t, self.cache, positions_t)[0]  # (N, dim)
        else:
            hidden = self.model(ids_t, self.cache, return_hidden=True, positions=positions_t)[0]
        self.stats.prefill_passes += 1
        self.stats.decode_steps += bool(decoding)
        rows = list(decoding)  # a decode row's token is the token at its slot index
        needed = rows + [segment.start + i for segment, chosen in zip(segments, picks) for i in chosen]
        logits = self._logits(hidden[needed])
        outputs = self._advance(decoding, logits[:len(rows)])
        offset = len(rows)
        for (sequence, slot, reused), chosen in zip(batch, picks):
            request, prompt = sequence.request, sequence.request.prompt_ids
            slot.computed = len(prompt)  # branches lie past the prompt: the prefix cache keeps the prompt only
            part = logits[offset:offset + len(chosen)]
            offset += len(chosen)
            prompt_logprobs = continuation_logprobs = None
            if request.continuations is not None:
                logprobs, continuation_logprobs = torch.log_softmax(part, dim=-1), []
                for branch_tokens in request.continuations:
                    continuation_logprobs.append([_logprob_entry(row_lp, token, 1)
                                                  for row_lp, token in zip(logprobs[:len(branch_tokens)], branch_tokens)])
                    logprobs = logprobs[len(branch_tokens):]
            elif request.prompt_logprobs is not None:
                start = reused + chosen[0] + 1  # the first prompt index scored
                logprobs = torch.log_softmax(part[:-1], dim=-1)
                prompt_logprobs = [None] * start + [_logprob_entry(row_lp, token, request.prompt_logprobs)
                                                    for row_lp, token in zip(logprobs, prompt[start:])]
            if request.sampling.max_new_tokens == 0 or request.continuations is not None:  # scoring only
                output = self._finish(sequence, RequestOutput(sequence.id, []), "length")
            else:
                output = self._sample(sequence, part[-1])
            output.prompt_logprobs, output.continuation_logprobs = prompt_logprobs, continuation_logprobs
            outputs.append(output)
        return outputs

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of final hidden states (N, dim), the product padded to a bucketed row count."""
        padded = hidden.new_zeros(shape_bucket(len(hidden)), hidden.shape[1])
        padded[:len(hidden)] = hidden
        return self.model.logits(padded)[:len(hidden)].float()

    # ---- decoding -------------------------------------------------------------------------------

    def _decode_rows(self, decoding: dict[int, _Sequence], drafts: Drafts | None = None,
                     width: int = 1, least: int = 1,
                     bucketed: bool = True) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
        """(tokens, positions, cache indices) (B, width) of slots 0..B-1 for one decode step, B the bucket
        that spans the running rows (and ``least``), or that span itself when not ``bucketed`` (a packed
        pass, whose length is padded as a whole): each row's pending token, then its guesses in
        ``drafts``. Slots without a running row, and the places a row leaves empty, are padding (token 0
        at position 0, written to the scratch column)."""
        span = max(max(decoding, default=-1) + 1, least)
        batch = next(b for b in self.decode_buckets if b >= span) if bucketed else span
        ids, positions = [[0] * width for _ in range(batch)], [[0] * width for _ in range(batch)]
        write = [[self.cache.scratch] * width for _ in range(batch)]
        for index, sequence in decoding.items():
            guesses = drafts[index][0] if drafts and index in drafts else []
            row, at = [sequence.pending, *guesses], len(sequence.slot.tokens)
            ids[index][:len(row)] = row
            positions[index][:len(row)] = write[index][:len(row)] = range(at, at + len(row))
        return ids, positions, write

    def _decode(self, decoding: dict[int, _Sequence], drafts: Drafts) -> list[RequestOutput]:
        """One forward pass over slots 0..B-1 (fixed shapes: the pass a compiled step runs): one token
        for every running row, or, when some rows have guesses in ``drafts``, each row's pending token
        and up to k guesses (B, 1 + k), k the most any of them may guess: every such step has one shape."""
        width = 1 + max((decoding[index].request.draft_tokens for index in drafts), default=0)
        ids, positions, write = self._decode_rows(decoding, drafts, width)
        ids_t = torch.tensor(ids, device=self.device)  # (B, width)
        positions_t = torch.tensor(positions, device=self.device)
        kv_len = key_count(max(map(max, positions)) + 1, self.cache.context)
        self.cache.bind(torch.tensor(write, device=self.device), kv_len)
        step = self.decode_step or self.model
        logits = step(ids_t, self.cache, positions=positions_t, mask=attention_mask(positions_t, kv_len),
                      **self._memory(len(ids)))
        self.stats.decode_steps += 1
        plain = {index: sequence for index, sequence in decoding.items() if index not in drafts}
        outputs = self._advance(plain, _rows(logits[:, 0], list(plain)).float())
        for index, (guesses, q) in drafts.items():
            outputs.append(self._check(decoding[index], guesses, q, logits[index, :len(guesses) + 1].float()))
        return outputs

    def _advance(self, decoding: dict[int, _Sequence], logits: torch.Tensor) -> list[RequestOutput]:
        """Feed each running row's pending token to its slot and sample the next from fp32 ``logits``
        (one row per entry of ``decoding``, in its order)."""
        rows = dict(enumerate(decoding.values()))
        drawn = self._draw_together(rows, logits)
        outputs = []
        for i, sequence in rows.items():
            sequence.slot.tokens.append(sequence.pending)
            sequence.slot.computed = len(sequence.slot.tokens)
            sequence.pending = None
            outputs.append(self._sample(sequence, logits[i], drawn.get(i)))
        return outputs

    def _draw_together(self, rows: dict[int, _Sequence], logits: torch.Tensor) -> dict[int, int]:
        """Tokens for the rows that sample with the same settings and nothing row-specific (no penalty, no
        constraint): one argmax for greedy rows; else one softmax and one cumulative sum over those rows, a
        random number from each row's own generator, so each row gets the token it would get alone (a
        rollout of 32 answers draws 32 rows)."""
        groups: dict[tuple, list[int]] = {}
        for index, sequence in rows.items():
            config = sequence.request.sampling
            if (sequence.generator is None or sequence.request.constraint is not None
                    or config.repetition_penalty != 1.0 or config.presence_penalty or config.frequency_penalty):
                continue
            groups.setdefault((config.temperature, config.top_k, config.top_p), []).append(index)
        drawn: dict[int, int] = {}
        for indices in groups.values():
            if len(indices) < 2:
                continue
            scores = self._in_vocabulary(_rows(logits, indices))
            config = rows[indices[0]].request.sampling
            tokens = draw(scores, config, [rows[i].generator for i in indices])
            drawn.update(zip(indices, tokens.tolist()))
        return drawn

    def _draft(self, decoding: dict[int, _Sequence]) -> Drafts:
        """The guesses of the running rows whose requests speculate and whose drafter found some: slot
        index -> (guesses, the distributions they were drawn from or None). At most as many as leave
        room for the model's own token within ``max_new_tokens``, and as keep the row's tokens within
        one key block (:func:`~lmforge.infer.slot_cache.block_room`): each then reads as many keys as
        the one-token step at its place would, so a checked guess's logits are that step's, to the bit
        in bf16, and greedy output stays that of plain decoding."""
        drafts = {}
        for index, sequence in decoding.items():
            request = sequence.request
            room = min(request.draft_tokens, request.sampling.max_new_tokens - len(sequence.generated) - 1,
                       block_room(len(sequence.slot.tokens)))
            if request.drafter is None or room < 1:
                continue
            guesses, q = request.drafter.propose(request.prompt_ids + sequence.generated, room, request.sampling,
                                                 sequence.generator)
            usable = next((i for i, t in enumerate(guesses[:room]) if not 0 <= t < self.vocab_size), len(guesses[:room]))
            if usable:
                drafts[index] = (guesses[:usable], None if q is None else q[:usable])
        return drafts

    def _check(self, sequence: _Sequence, guesses: list[int], q: torch.Tensor | None,
               logits: torch.Tensor) -> RequestOutput:
        """Verify a row's guesses against the model's fp32 logits (1 + g, V) at their places: keep those
        it agrees with and add its own next token; each token ends the request as a sampled one would."""
        new = verify(self._in_vocabulary(logits), guesses, q, sequence.request.sampling, sequence.generator)
        self.stats.drafted += len(guesses)
        self.stats.accepted += len(new) - 1
        slot = sequence.slot
        slot.tokens += [sequence.pending, *new[:-1]]  # the keys computed for the kept guesses are right
        slot.computed, sequence.pending = len(slot.tokens), None
        output = RequestOutput(sequence.id, [])
        for token, row in zip(new, logits):
            if self._emit(sequence, output, token, row):
                break
        return output

    def _sample(self, sequence: _Sequence, logits: torch.Tensor, token: int | None = None) -> RequestOutput:
        """Choose the next token from fp32 logits (V,) unless ``token`` was drawn already, record it, and
        report what it added."""
        if token is None:  # not drawn with other rows
            token = self._choose(sequence, logits)
        output = RequestOutput(sequence.id, [])
        self._emit(sequence, output, token, logits)
        return output

    def _in_vocabulary(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (..., V), or a copy with the ids past the tokenizer's at -inf (never chosen)."""
        if self.vocab_limit is None:
            return logits
        scores = logits.clone()
        scores[..., self.vocab_limit:] = float("-inf")
        return scores

    def _choose(self, sequence: _Sequence, logits: torch.Tensor) -> int:
        """Draw one row's next token from its fp32 logits (V,) with its penalties and constraint."""
        request, config = sequence.request, sequence.request.sampling
        scores = self._in_vocabulary(logits[None])  # (1, V)
        if config.repetition_penalty != 1.0:
            seen = torch.tensor([request.prompt_ids + sequence.generated], device=self.device)
            scores = apply_repetition_penalty(scores, seen, config.repetition_penalty)
        if config.presence_penalty or config.frequency_penalty:
            if sequence.counts is None:
                sequence.counts = torch.zeros(self.vocab_size, device=self.device)
            scores = apply_presence_frequency_penalty(scores, sequence.counts[None], config.presence_penalty,
                                                      config.frequency_penalty)
        if request.constraint is not None:
            remaining = config.max_new_tokens - len(sequence.generated)
            allowed = request.constraint.allowed(remaining).to(self.device)
            scores = scores.masked_fill(~allowed[None], float("-inf"))
        return int(draw(scores, config, sequence.generator)[0])

    def _emit(self, sequence: _Sequence, output: RequestOutput, token: int, logits: torch.Tensor) -> bool:
        """Record ``token`` (chosen from fp32 ``logits`` (V,)) in the request and in ``output``; True when
        it ended the request (a stop token or string, the token limit), else it is the row's pending token."""
        request, config = sequence.request, sequence.request.sampling
        sequence.generated.append(token)
        self.stats.generated_tokens += 1
        if sequence.counts is not None:
            sequence.counts[token] += 1
        if request.logprobs is not None:  # a stop token gets its entry too (scoring counts one generated token)
            output.logprobs.append(_logprob_entry(torch.log_softmax(logits, dim=-1), token, request.logprobs))
        if token in sequence.stop_ids:
            output.stop_token_id = token
            self._finish(sequence, output, "stop")
            return True
        if request.constraint is not None:
            request.constraint.advance(token)
        output.token_ids.append(token)
        if sequence.text is not None:
            text, stopped = sequence.stops.push(sequence.text.push(token))
            output.text += text
            if stopped:
                self._finish(sequence, output, "stop", flush=False)
                return True
        if len(sequence.generated) >= config.max_new_tokens:
            self._finish(sequence, output, "length")
            return True
        sequence.pending = token
        self._count(sequence, output)
        return False

    def _finish(self, sequence: _Sequence, output: RequestOutput, reason: str, flush: bool = True) -> RequestOutput:
        """End a request: release its slot (its tokens stay for the prefix cache), flush held-back text."""
        if flush and sequence.text is not None:
            text, stopped = sequence.stops.push(sequence.text.flush())
            output.text += text if stopped else text + sequence.stops.flush()
        if sequence.slot is not None:
            sequence.slot.sequence, sequence.slot.last_used = None, time.monotonic()
        if sequence.request.drafter is not None:
            sequence.request.drafter.reset()  # a draft model's cache
        self.running.pop(sequence.id, None)
        sequence.pending = None
        output.finished, output.finish_reason = True, reason
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        return self._count(sequence, output)

    @staticmethod
    def _count(sequence: _Sequence, output: RequestOutput) -> RequestOutput:
        output.prompt_tokens = len(sequence.request.prompt_ids)
        output.cached_tokens = sequence.cached_tokens
        output.completion_tokens = len(sequence.generated)
        return output


def _rows(tensor: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """``tensor[indices]``: a view when they are 0, 1, 2, ... (a full batch, as usual), else a gathered copy."""
    if indices == list(range(len(indices))):
        return tensor[:len(indices)]
    return tensor[indices]


def shape_bucket(n: int) -> int:
    """``n`` rounded up to eight steps an octave (1..16 as they are, then 18, 20, ..., 32, 36, 40, ...):
    at most an eighth of padding, and eight distinct sizes an octave (about ninety up to 4,096)."""
    step = max(1, 2 ** (n.bit_length() - 4))
    return -(-n // step) * step


def _branch_tokens(request: Request) -> int:
    return sum(map(len, request.continuations or ()))


def _new_tokens(request: Request, reused: int) -> int:
    """The tokens a request puts through its prefill: its prompt after the reused prefix, and its branches."""
    return len(request.prompt_ids) - reused + _branch_tokens(request)


def _logprob_entry(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """``token``'s log-probability under fp32 log-probabilities (V,), and the ``top`` likeliest tokens."""
    entry = TokenLogprob(token, float(logprobs[token]))
    if top > 0:
        values, ids = logprobs.topk(top)
        entry.top = list(zip(ids.tolist(), values.tolist()))
    return entry
