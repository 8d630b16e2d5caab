"""The inspector: every concept of the notes shown on a live model (``lmforge inspect``, the Inspect page).

:func:`inspect_text` runs a model once over a text and returns an :class:`Inspection`: tokens, attention
weights with the queries and keys behind them, the logit lens, the residual stream's norms, the next-token
distribution under any sampler settings and the KV cache's growth, as NumPy arrays and dataclasses.

The other stages have a view each: :func:`lora_view` (an adapter's update beside its frozen weight),
:func:`quant_view` (rounding errors and the grid of levels), :func:`reward_view` and
:func:`policy_ratio_view` (a reward model's and an aligned policy's view of a reply, token by token) and
:func:`rag_view` (retrieved chunks, their scores, and where each sits in the prompt).
"""

from lmforge.inspector.alignment import RatioView, RewardView, policy_ratio_view, reward_view
from lmforge.inspector.core import (
    CacheStep,
    CacheView,
    Candidate,
    Inspection,
    NextToken,
    QueryKeys,
    Token,
    TokenCount,
    check_inspectable,
    inspect_text,
    load_inspectable,
)
from lmforge.inspector.lora import LoraView, load_lora, lora_view
from lmforge.inspector.quant import QuantView, quant_view
from lmforge.inspector.rag import RagView, rag_view

__all__ = ["CacheStep", "CacheView", "Candidate", "Inspection", "LoraView", "NextToken", "QuantView", "QueryKeys",
           "RagView", "RatioView", "RewardView", "Token", "TokenCount", "check_inspectable", "inspect_text",
           "load_inspectable", "load_lora", "lora_view", "policy_ratio_view", "quant_view", "rag_view", "reward_view"]
