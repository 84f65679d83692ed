"""Masked token log-likelihood: the one computation behind the training loss, label scoring and the loss checks."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """log p(targets[b, t]) under logits[b, t] (already aligned: position t predicts targets[:, t]), in float32;
    0 where the target is `ignore_index`."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    mask = targets != ignore_index
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask


def shifted_targets(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal-LM alignment: logits of positions 0..T-2 predict labels 1..T-1. Logits may cover only the last K
    positions (`logits_to_keep`); they are matched to the end of `labels`."""
    kept = logits.shape[1]
    return logits[:, :-1], labels[:, labels.shape[1] - kept + 1:]


def sequence_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the summed log-likelihood of the supervised tokens (labels != -100), shape (batch,)."""
    return token_log_probs(*shifted_targets(logits, labels)).sum(-1)


def mean_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per supervised token over the whole batch (what the training loss reports)."""
    lp, tgt = shifted_targets(logits, labels)
    n = (tgt != IGNORE_INDEX).sum().clamp(min=1)
    return -token_log_probs(lp, tgt).sum() / n
