"""Next-token cross entropy with the output layer folded in, a block of positions at a time.

A language model's loss over N positions needs logits (N, V): at the speedrun's shape (16 x
256 positions, 8,192 tokens) 134 MB in fp32, written by the output layer, copied to fp32,
read by log-softmax, and a gradient of the same size written back through each of those
steps. :func:`token_loss` never holds the fp32 logits. For each block of positions it
computes the block's logits, their log-sum-exp and the loss, and at once the gradient of
the mean loss with respect to those logits, softmax minus one-hot, divided by the number of
counted targets:

    d loss / d logits[i] = (softmax(logits[i]) - onehot(target[i])) / count

from which the block's gradient of the hidden states (g @ W) follows before the next block
reuses the memory. Each block's g is kept in the products' dtype (bf16 under autocast: half
the fp32 logits' bytes) for one product at the end, the output layer's gradient g^T @ h
(accumulating one per block read the fp32 weight gradient again for every block: T5's
shape, 832 positions, 31.4 against 23.9 ms). The backward pass only scales these by the
loss's own gradient. The same products as the plain path are computed (one for the logits,
two for the gradients), in the same dtype, so the loss and gradients equal the plain path's
up to the order of fp32 sums (tested).

Measured on 2 cores (Intel AMX), the loss and its backward alone, 4,096 positions, bf16:
8,192 tokens x dim 256 in blocks of 128 positions 178 ms against 357 for the plain path;
SmolLM2's 49,152 x 576 in one block of 4,096 1.2x faster than plain (blocks of 128 there:
1.7x slower, the output layer read 32 times). Whole training steps, interleaved with the
plain loss in one process: the speedrun's shape (`cpu-small`, 16 x 256) +19-25% tokens/s in
bf16 and +11% in fp32; llama-42m (8 x 256, 32,000 tokens, its products dominate) +11% in
fp32, +2% in bf16; T5's span stage level (its loss is a small part of its step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100  # a target the loss skips (F.cross_entropy's ignore_index)


def block_rows(vocab_size: int, dim: int) -> int:
    """Positions per block. A small output layer (up to 4M weights: 8,192 x 256 and T5's 8,292 x 256) is cheap
    to read again for every block, so blocks of 128 positions keep each block's fp32 logits near a core's
    cache (4 MB at 8,192 tokens). A large one (llama-42m's 32,000 x 512, SmolLM2's 49,152 x 576) costs more to
    read again than the blocks save (SmolLM2's in blocks of 128: 1.7x slower than the plain path), so its
    blocks are as large as keep their logits within 512 MB."""
    return 128 if vocab_size * dim <= 2**22 else max(128, 2**27 // vocab_size)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross entropy of ``hidden @ weight.T`` against ``targets``; its gradients made in the forward pass."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, count_hits: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        w = weight.to(hidden.dtype)  # the products run in the hidden states' dtype (bf16 under autocast)
        counted = targets != IGNORE
        count = counted.sum().clamp(min=1)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # (a frozen head: LoRA)
        want = want_hidden or want_weight
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # each block's gradient of its logits, kept in the products' dtype for one weight-gradient product at the
        # end (accumulating a product per block into an fp32 weight gradient read it again for every block)
        grads = torch.empty(hidden.shape[0], weight.shape[0], dtype=hidden.dtype, device=hidden.device) \
            if want_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        hits = torch.zeros((), dtype=torch.long, device=hidden.device)  # counted targets of the largest logit
        step = block_rows(*weight.shape)
        for start in range(0, hidden.shape[0], step):
            h, t, keep = hidden[start:start + step], targets[start:start + step], counted[start:start + step]
            rows, t = torch.arange(h.shape[0], device=h.device), t.clamp(min=0)
            logits = (h @ w.T).float()  # (n, V)
            lse, picked = torch.logsumexp(logits, dim=-1), logits[rows, t]
            total += ((lse - picked) * keep).sum()
            if count_hits:  # the target's logit is the largest (a reduction cheaper than argmax)
                hits += ((picked >= logits.amax(dim=-1)) & keep).sum()
            if want:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[rows, t] -= 1.0
                grad = probs.mul_((keep / count)[:, None]).to(hidden.dtype)
                if want_hidden:
                    grad_hidden[start:start + step] = grad @ w
                if want_weight:
                    grads[start:start + step] = grad
        grad_weight = (grads.T @ hidden).float() if want_weight else None
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(hits)
        return total / count, hits

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_hits: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * grad_loss).to(ctx.weight_dtype), None, None)


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel and torch.compile wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module) or isinstance(getattr(model, "_orig_mod", None),
                                                                             nn.Module):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def plain_output_layer(model: nn.Module) -> nn.Linear | None:
    """The model's output layer when it is a plain linear layer without a bias applied to the final hidden
    states as they are (a decoder's or an encoder-decoder's ``lm_head``); None for anything else (LoRA or
    QAT layers, BERT's transform before its head)."""
    model = unwrapped(model)
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear or head.bias is not None or getattr(model, "mlm_dense", None) is not None:
        return None
    return head


def token_loss(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of ``targets`` (...,) given the model's final hidden states (..., dim),
    over the targets that are not :data:`IGNORE` (0 when none is). A plain output layer is folded in, block
    by block (the module docstring); any other goes through ``F.cross_entropy`` on its full logits."""
    return _token_loss(model, hidden, targets, count_hits=False)[0]


def token_loss_and_hits(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_loss`, and how many counted targets are a most likely token (an accuracy's numerator)."""
    return _token_loss(model, hidden, targets, count_hits=True)


def _token_loss(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, count_hits: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    head = plain_output_layer(model)
    hidden, targets = hidden.flatten(0, -2), targets.flatten()
    if head is not None:
        return _LinearCrossEntropy.apply(hidden, head.weight, targets, count_hits)
    inner = unwrapped(model)
    logits = (inner.logits(hidden) if hasattr(inner, "logits") else inner.lm_head(hidden)).float()
    counted = targets != IGNORE
    total = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
    hits = ((logits.argmax(-1) == targets) & counted).sum() if count_hits else targets.new_zeros(())
    return total / counted.sum().clamp(min=1), hits
