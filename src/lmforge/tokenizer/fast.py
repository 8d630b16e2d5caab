"""A ``tiktoken`` mirror of a trained BPE vocabulary: the same ids, encoded faster.

Hugging Face ``tokenizers`` and ``tiktoken`` run the same byte-level BPE with
different bookkeeping:

* ``tokenizers`` keeps a merge list and, inside a piece, repeatedly merges the
  adjacent pair that comes earliest in that list (rank of the *pair*);
* ``tiktoken`` keeps only ``token bytes -> rank`` and repeatedly merges the
  adjacent pair whose *concatenation* has the lowest rank (rank of the *merged
  token*), and first looks the whole piece up as one token.

Giving every token its Hugging Face id as its tiktoken rank makes the two agree
when the vocabulary has two properties, which :func:`merge_order_problem`
checks:

1. merge ``i`` created token ``first_merge_id + i``: ids follow merge order and
   no two merges made the same string (if ``"ab"+"c"`` and later ``"a"+"bc"``
   both made ``"abc"``, tiktoken could only give them one priority);
2. for every merge ``(a, b) -> t``, tiktoken's rule applied to the bytes of
   ``t`` with only lower ranks allowed ends in exactly ``[a, b]``; otherwise
   tiktoken could reach ``t`` (or stop short of it) through a split that the
   merge list never makes.

The whole-piece lookup corresponds to ``tokenizers``' ``ignore_merges=True``,
which lmforge tokenizers set. Vocabularies trained by lmforge have passed both
checks in every case tried (see the tests); a vocabulary that fails keeps the
``tokenizers`` path, which stays the source of truth.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import tiktoken

from lmforge.tokenizer.bytelevel import SPLIT_PATTERN


def _split_by_token_rank(data: bytes, ranks: Mapping[bytes, int], below: int) -> list[bytes]:
    """tiktoken's merge rule on ``data``, using only tokens with rank ``< below``.

    Runs once per vocabulary entry at load time, so it keeps the rank of each
    adjacent pair and updates only the two neighbours of a merge (C-level
    ``min``/``index`` over a short list). Ties go to the leftmost pair, as in both libraries.
    """
    parts = [data[index : index + 1] for index in range(len(data))]
    # pair_ranks[i] = rank of parts[i] + parts[i + 1]; `below` means "not mergeable".
    pair_ranks = [ranks.get(parts[index] + parts[index + 1], below) for index in range(len(parts) - 1)]
    while pair_ranks:
        best = min(pair_ranks)
        if best >= below:
            break
        index = pair_ranks.index(best)
        parts[index : index + 2] = [parts[index] + parts[index + 1]]
        del pair_ranks[index]
        if index < len(pair_ranks):
            pair_ranks[index] = ranks.get(parts[index] + parts[index + 1], below)
        if index > 0:
            pair_ranks[index - 1] = ranks.get(parts[index - 1] + parts[index], below)
    return parts


def byte_problem(ranks: Mapping[bytes, int]) -> str | None:
    """Why tiktoken cannot encode with ``ranks``: a single byte without a token of its own (tiktoken starts
    from single bytes and panics on one it lacks); ``None`` if every byte has one."""
    missing = [value for value in range(256) if bytes([value]) not in ranks]
    return f"byte {missing[0]:#04x} is not a token of its own" if missing else None


def merge_order_problem(
    ranks: Mapping[bytes, int], merges: Sequence[tuple[bytes, bytes]], first_merge_id: int
) -> str | None:
    """Why tiktoken would encode differently from the merge list, or ``None`` if it would not.

    ``ranks`` maps each non-special token's bytes to its id; ``merges`` are the
    Hugging Face merges in priority order, as byte pairs; merge ``i`` must have
    created id ``first_merge_id + i``. The message names the first offending merge.
    """
    for index, (left, right) in enumerate(merges):
        merged = left + right
        expected_id = first_merge_id + index
        actual_id = ranks.get(merged)
        if actual_id != expected_id:
            return (
                f"merge {index} ({left!r} + {right!r}) made id {actual_id}, expected {expected_id}: "
                "ids do not follow merge order, or two merges made the same token"
            )
        if len(merged) == 2:
            continue  # two single bytes: the only pair is the token itself, so tiktoken agrees
        parts = _split_by_token_rank(merged, ranks, below=expected_id)
        if parts != [left, right]:
            return f"merge {index} ({left!r} + {right!r}) is reached by tiktoken's rule as {parts!r}"
    return None


def build_encoding(
    ranks: Mapping[bytes, int], special_ids: Mapping[str, int], name: str = "lmforge"
) -> tiktoken.Encoding:
    """A ``tiktoken.Encoding`` with our split pattern, ``ranks`` as mergeable ranks and our specials.

    Contract: ``ranks`` and ``special_ids`` together cover ids ``0..n-1`` exactly
    once (tiktoken checks this through ``explicit_n_vocab``). Whether its ids
    equal the merge list's is :func:`merge_order_problem`'s question, not this one's.
    """
    return tiktoken.Encoding(
        name,
        pat_str=SPLIT_PATTERN,
        mergeable_ranks=dict(ranks),
        special_tokens=dict(special_ids),
        explicit_n_vocab=len(ranks) + len(special_ids),
    )
