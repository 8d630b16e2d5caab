"""The output layer folded into the loss, block by block: the same loss and gradients as full logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.model import DecoderLM, preset
from lmforge.train.lm_loss import IGNORE, block_rows, plain_output_layer, token_loss, token_loss_and_hits
from lmforge.train.pretrain import PretrainStage


def reference(hidden, weight, targets):
    total = F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=IGNORE, reduction="sum")
    return total / (targets != IGNORE).sum().clamp(min=1)


def head_model(vocab: int, dim: int) -> torch.nn.Module:
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(dim, vocab, bias=False)
    return model


def test_blocks_give_the_loss_and_gradients_of_full_logits():
    torch.manual_seed(0)
    model = head_model(97, 16)
    hidden = torch.randn(300, 16, requires_grad=True)  # 3 blocks of 128 positions, the last one short
    targets = torch.randint(0, 97, (300,))
    targets[::7] = IGNORE
    results = []
    for fn in (lambda: token_loss(model, hidden, targets), lambda: reference(hidden, model.lm_head.weight, targets)):
        hidden.grad = model.lm_head.weight.grad = None
        loss = fn()
        (loss * 3).backward()  # the loss's own gradient is applied, not assumed to be 1
        results.append((loss, hidden.grad.clone(), model.lm_head.weight.grad.clone()))
    assert block_rows(97, 16) == 128 and block_rows(49152, 576) == 2730
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the hits: counted targets that are the argmax (none of the ignored ones)
        _, hits = token_loss_and_hits(model, hidden, targets)
        best = (hidden @ model.lm_head.weight.T).argmax(-1)
    targets_hit = best.clone()
    targets_hit[:150] = (best[:150] + 1) % 97  # half of them missed on purpose
    targets_hit[::7] = IGNORE
    with torch.no_grad():
        _, hits_half = token_loss_and_hits(model, hidden, targets_hit)
    assert hits.item() == int(((best == targets) & (targets != IGNORE)).sum())
    assert hits_half.item() == int(((best == targets_hit) & (targets_hit != IGNORE)).sum()) > 100


def test_bf16_blocks_stay_within_bf16_of_fp32_and_nothing_counted_gives_zero():
    torch.manual_seed(0)
    model = head_model(50, 32)
    hidden = torch.randn(200, 32)
    targets = torch.randint(0, 50, (200,))
    with torch.autocast("cpu", torch.bfloat16):
        low = token_loss(model, hidden.bfloat16(), targets)
    torch.testing.assert_close(low, reference(hidden, model.lm_head.weight.detach(), targets), rtol=2e-2, atol=2e-2)
    hidden.requires_grad_(True)
    none = token_loss(model, hidden, torch.full((200,), IGNORE))
    none.backward()
    assert none.item() == 0.0 and not hidden.grad.any() and not model.lm_head.weight.grad.any()


def test_other_output_layers_take_full_logits():
    class Scaled(torch.nn.Linear):  # any layer that is not a plain Linear (LoRA, QAT) may compute otherwise
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    model = torch.nn.Module()
    model.lm_head = Scaled(8, 11, bias=False)
    assert plain_output_layer(model) is None and plain_output_layer(head_model(11, 8)) is not None
    hidden, targets = torch.randn(5, 8), torch.randint(0, 11, (5,))
    expected = F.cross_entropy(model.lm_head(hidden), targets)
    torch.testing.assert_close(token_loss(model, hidden, targets), expected)
    loss, hits = token_loss_and_hits(model, hidden, targets)
    assert hits.item() == int((model.lm_head(hidden).argmax(-1) == targets).sum())


def test_pretraining_loss_and_gradients_equal_full_logits_and_the_head_is_found_inside_a_wrapper():
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=97)).train()
    ids = torch.randint(0, 97, (3, 21))
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}
    grads = []
    for fn in (lambda: PretrainStage.loss(model, batch),
               lambda: F.cross_entropy(model(batch["input_ids"]).flatten(0, 1), batch["targets"].flatten())):
        model.zero_grad()
        fn().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    wrapper = torch.nn.Module()  # what DDP and torch.compile put around the model
    wrapper.module = model
    assert plain_output_layer(wrapper) is model.lm_head


def test_a_frozen_output_layer_gets_no_gradient_and_the_hidden_states_theirs():
    torch.manual_seed(0)
    model = head_model(40, 8)
    model.lm_head.weight.requires_grad_(False)  # LoRA training leaves the output layer frozen
    hidden, targets = torch.randn(20, 8, requires_grad=True), torch.randint(0, 40, (20,))
    token_loss(model, hidden, targets).backward()
    ours = hidden.grad.clone()
    hidden.grad = None
    reference(hidden, model.lm_head.weight, targets).backward()
    assert model.lm_head.weight.grad is None
    torch.testing.assert_close(ours, hidden.grad, rtol=1e-5, atol=1e-6)
