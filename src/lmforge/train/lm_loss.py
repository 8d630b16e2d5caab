"""Next-token cross entropy with the output layer folded in, a block of positions at a time.

A language model's loss over N positions needs logits (N, V): at the speedrun's shape (16 x
256 positions, 8,192 tokens) 134 MB in fp32, written by the output layer, copied to fp32,
read by log-softmax, and a gradient of the same size written back through each of those
steps. :func:`token_loss` never holds them all. For each block of positions it computes the
block's logits, their log-sum-exp and the loss, and at once the gradient of the mean loss
with respect to those logits, softmax minus one-hot, divided by the number of counted
targets:

    d loss / d logits[i] = (softmax(logits[i]) - onehot(target[i])) / count

from which the block's gradients of the hidden states (g @ W) and of the output layer's
weight (g^T @ h) follow before the next block reuses the memory. The backward pass only
scales these by the loss's own gradient. The same products as the plain path are
computed (one for the logits, two for the gradients), in the same dtype (bf16 under
autocast), so the loss and gradients equal the plain path's up to the order of fp32 sums
(tested). Measured on 2 cores (Intel AMX), the loss and its backward alone, 4,096
positions, bf16: 8,192 tokens x dim 256 in blocks of 128 positions 178 ms against 357 for
the plain path; SmolLM2's 49,152 x 576 in one block of 4,096 1.2x faster than plain (blocks
of 128 there: 1.7x slower, the output layer read 32 times). Whole training steps, interleaved
with the plain loss in one process: the speedrun's shape (`cpu-small`, 16 x 256) +19% tokens/s
in bf16 and +11% in fp32; llama-42m (8 x 256, 32,000 tokens, its products dominate) +11% in
fp32, +2% in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100  # a target the loss skips (F.cross_entropy's ignore_index)


def block_rows(vocab_size: int) -> int:
    """Positions per block: 128 while a block's fp32 logits fit in 4 MB (a core's cache: vocabularies up
    to 8,192), else as many as keep them within 512 MB, so a large output layer is read fewer times
    (blocks of 128 over SmolLM2's 49,152 tokens were 1.7x slower than the plain path)."""
    return 128 if vocab_size <= 8192 else max(128, 2**27 // vocab_size)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross entropy of ``hidden @ weight.T`` against ``targets``; its gradients made in the forward pass."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        w = weight.to(hidden.dtype)  # the products run in the hidden states' dtype (bf16 under autocast)
        counted = targets != IGNORE
        count = counted.sum().clamp(min=1)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # (a frozen head: LoRA)
        want = want_hidden or want_weight
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        step = block_rows(weight.shape[0])
        for start in range(0, hidden.shape[0], step):
            h, t, keep = hidden[start:start + step], targets[start:start + step], counted[start:start + step]
            rows, t = torch.arange(h.shape[0], device=h.device), t.clamp(min=0)
            logits = (h @ w.T).float()  # (n, V)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits[rows, t]) * keep).sum()
            if want:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[rows, t] -= 1.0
                grad = probs.mul_((keep / count)[:, None]).to(hidden.dtype)
                if want_hidden:
                    grad_hidden[start:start + step] = grad @ w
                if want_weight:
                    grad_weight += (grad.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * grad_loss).to(ctx.weight_dtype), None)


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
    head = plain_output_layer(model)
    hidden, targets = hidden.flatten(0, -2), targets.flatten()
    if head is not None:
        return _LinearCrossEntropy.apply(hidden, head.weight, targets)
    inner = unwrapped(model)
    logits = inner.logits(hidden) if hasattr(inner, "logits") else inner.lm_head(hidden)
    total = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")
    return total / (targets != IGNORE).sum().clamp(min=1)
