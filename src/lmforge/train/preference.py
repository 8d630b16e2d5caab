"""Losses of preference learning: reward models (Bradley-Terry), DPO / cDPO / IPO, and SimPO.

Pure torch, no model code: each function takes per-sequence scores or log-probabilities and returns
per-example losses (or a mean) plus the detached quantities worth logging. Notation used throughout:

* ``π`` is the policy being trained, ``π_ref`` the frozen reference (usually the SFT model);
* ``y_w`` / ``y_l`` are the chosen (preferred) and rejected completions of the same prompt ``x``;
* ``log π(y|x)`` is the sum over completion tokens of ``log p(token)`` (see :func:`sequence_logps`);
* ``h = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)]`` is the log-ratio
  difference, the implicit reward margin of DPO divided by ``β``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor,
                   mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of ``log p(label_t)`` over the positions where ``mask`` is true.

    ``sum_logps[b] = Σ_t mask[b, t] · log softmax(logits[b, t])[labels[b, t]]``, computed in fp32
    (``log p = logit[label] − logsumexp(logits)``) whatever the dtype of ``logits``.

    Convention: the inputs are **already shifted**, i.e. ``logits[:, t]`` is the prediction for
    ``labels[:, t]``. From a causal LM run on ``input_ids`` (B, T+1) that means::

        logits = model(input_ids)[:, :-1]      # (B, T, V)
        labels = input_ids[:, 1:]              # (B, T)
        mask = completion_mask[:, 1:]          # (B, T), True on completion (response) tokens

    Labels at masked-out positions are ignored and may hold anything (e.g. ``-100``).

    Returns ``(sum_logps, token_counts)``, both of shape (B,): the fp32 sums and the number of
    counted tokens (int64). The length-averaged log-probability (used by SimPO, and by TRL's IPO)
    is ``sum_logps / token_counts.clamp(min=1)``.
    """
    if logits.shape[:-1] != labels.shape or labels.shape != mask.shape:
        raise ValueError(f"shapes must be (B, T, V), (B, T), (B, T); got {tuple(logits.shape)}, "
                         f"{tuple(labels.shape)}, {tuple(mask.shape)}")
    mask = mask.bool()
    token_logps = label_logps(logits, torch.where(mask, labels, torch.zeros_like(labels)))
    sum_logps = (token_logps * mask).sum(-1)
    return sum_logps, mask.sum(-1)


def label_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[label]`` at each position, in fp32: logits (..., V), labels (...) -> (...)."""
    logits = logits.float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                       margin: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Pairwise reward-model loss under the Bradley-Terry model, averaged over the batch.

    ``loss = mean(−log σ(r_c − r_r − m))`` where ``r_c`` / ``r_r`` are the scalar rewards of the
    chosen / rejected completion and ``m`` an optional per-pair margin (0 when ``None``).

    Bradley & Terry (1952), "Rank Analysis of Incomplete Block Designs"; as a reward-model loss in
    Ouyang et al. (2022), "Training language models to follow instructions with human feedback"
    (InstructGPT); the margin term is from Touvron et al. (2023), "Llama 2", §3.2.2.

    Returns ``(loss, metrics)`` with ``metrics = {"accuracy": mean(r_c > r_r),
    "margin": mean(r_c − r_r)}`` (plain floats, the margin ``m`` not subtracted).
    """
    diff = chosen_scores.float() - rejected_scores.float()
    logits = diff if margin is None else diff - margin
    loss = -F.logsigmoid(logits).mean()
    diff = diff.detach()
    metrics = {"accuracy": (diff > 0).float().mean().item(), "margin": diff.mean().item()}
    return loss, metrics


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct preference optimization and its variants, per example.

    With ``h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))``:

    * ``"sigmoid"``: DPO, Rafailov et al. (2023), "Direct Preference Optimization: Your Language
      Model is Secretly a Reward Model": ``loss = −log σ(β·h)``. With ``label_smoothing = ε > 0``
      it is conservative DPO (cDPO; Mitchell (2023), "A note on DPO with noisy preferences"), which
      assumes each label is flipped with probability ε:
      ``loss = (1 − ε)·(−log σ(β·h)) + ε·(−log σ(−β·h))``. ε = 0 is plain DPO.
    * ``"ipo"``: IPO, Azar et al. (2023), "A General Theoretical Paradigm to Understand Learning
      from Human Preferences": ``loss = (h − 1/(2β))²``, a squared loss that regresses the
      log-ratio gap to a finite target instead of pushing it to infinity. ``label_smoothing`` is
      ignored.

    ``average_log_prob`` note: this function uses the log-probabilities exactly as given. The IPO
    paper is written with summed sequence log-probabilities; TRL's ``DPOTrainer`` (and the
    original ``average_log_prob=True`` option of the DPO reference code) instead feeds IPO
    length-averaged log-probabilities, ``sum_logps / token_counts`` from :func:`sequence_logps`.
    Pass averaged log-probabilities (for policy and reference alike) to reproduce TRL's IPO; the
    target ``1/(2β)`` is then per token, so β should be chosen accordingly.

    Only the policy log-probabilities receive gradients: the reference ones are detached here.

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each of shape (B,), where the implicit
    rewards ``β·(log π(y) − log π_ref(y))`` are detached (for logging; see
    :func:`preference_metrics`). Reduce ``losses`` with ``.mean()``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio = policy_chosen_logps.float() - ref_chosen_logps.detach().float()
    rejected_ratio = policy_rejected_logps.float() - ref_rejected_logps.detach().float()
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
        if label_smoothing > 0:
            losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def answer_nll(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """The chosen answers' negative log-likelihood per token over the whole batch (a scalar): RPO's
    term (Pang et al. (2024), "Iterative Reasoning Preference Optimization"), which DPO adds with a
    weight α so that the chosen answers also become likelier, not only likelier than the rejected.
    ``chosen_logps``: summed log-probabilities (B,); ``chosen_tokens``: their token counts (B,). As
    TRL (≥ 1.0: ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, α]``): every answer token of
    the batch weighs the same."""
    return -chosen_logps.float().sum() / chosen_tokens.sum().clamp(min=1)


def simpo_loss(chosen_logps_avg: torch.Tensor, rejected_logps_avg: torch.Tensor, beta: float = 2.0,
               gamma: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO, Meng et al. (2024), "SimPO: Simple Preference Optimization with a Reference-Free Reward".

    Reference-free and length-normalized: the reward is ``β·(1/|y|)·log π(y|x)``, so the inputs are
    the **length-averaged** log-probabilities ``sum_logps / token_counts`` (:func:`sequence_logps`):

    ``loss = −log σ(β·avg_logp(y_w) − β·avg_logp(y_l) − γ)``

    ``gamma`` is the target reward margin γ of the paper's formula, in reward units (the same as
    TRL's ``CPOConfig.simpo_gamma``); the SimPO code base sets it instead as ``gamma_beta_ratio``
    = γ/β, so ``gamma = beta * gamma_beta_ratio``.

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each of shape (B,); the rewards
    ``β·avg_logp`` are detached.
    """
    chosen_rewards = beta * chosen_logps_avg.float()
    rejected_rewards = beta * rejected_logps_avg.float()
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> dict[str, float]:
    """Batch means to log, under TRL's names.

    ``rewards/chosen`` / ``rewards/rejected``: mean implicit reward of each side;
    ``rewards/accuracies``: fraction of pairs with chosen reward > rejected reward;
    ``rewards/margins``: mean (chosen − rejected) reward; ``logps/chosen`` / ``logps/rejected``:
    mean policy log-probability of each side.
    """
    chosen_rewards, rejected_rewards = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": chosen_logps.detach().float().mean().item(),
        "logps/rejected": rejected_logps.detach().float().mean().item(),
    }
