"""The proxy predictor's network and its training losses: a sentence encoder, mean-pooled, under a head of
log-length quantiles that never cross (src.predictors.proxy saves and loads it)."""

from __future__ import annotations

import torch
from torch import nn


class QuantileHead(nn.Module):
    """Pooled embedding -> log-length quantiles, non-decreasing by construction."""

    def __init__(self, hidden_size: int, num_quantiles: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, num_quantiles)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        raw = self.linear(pooled)  # [B, Q]
        median, increments = raw[:, :1], nn.functional.softplus(raw[:, 1:])
        return torch.cat([median, median + increments.cumsum(dim=1)], dim=1)  # [B, Q]


class LengthProxy(nn.Module):
    def __init__(
        self,
        encoder,
        quantiles: tuple[float, ...],
        initial_log_length: float = 0.0,
        ranking_weight: float = 0.0,
        auxiliary_targets: int = 0,
        auxiliary_weight: float = 0.0,
    ):
        super().__init__()
        self.encoder = encoder
        self.quantiles = tuple(quantiles)
        self.ranking_weight = ranking_weight  # weight of the pairwise ranking loss beside the quantile loss
        self.head = QuantileHead(encoder.config.hidden_size, len(self.quantiles))
        with torch.no_grad():  # start at the data's typical length, so early steps learn ranking, not scale
            self.head.linear.bias[0] = initial_log_length
        # training only (not saved): medians of further lengths of the same prompt (each temperature's), whose
        # loss gives the shared encoder more signal than the one noisy L_max
        self.auxiliary_weight = auxiliary_weight
        self.auxiliary_head = nn.Linear(encoder.config.hidden_size, auxiliary_targets) if auxiliary_targets else None
        if self.auxiliary_head is not None:
            with torch.no_grad():
                self.auxiliary_head.bias.fill_(initial_log_length)

    def forward(self, input_ids, attention_mask, labels=None):
        # input_ids, attention_mask: [B, S]; labels: [B], log(L_max), or [B, 1 + A] with the auxiliary log-lengths
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, S, H]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, S, 1]
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # [B, H]
        log_quantiles = self.head(pooled)  # [B, Q]
        output = {"logits": log_quantiles}
        if labels is not None:
            target = labels if labels.dim() == 1 else labels[:, 0]  # [B]
            output["loss"] = pinball_loss(log_quantiles, target, self.quantiles)
            if self.ranking_weight:
                ranking = pairwise_ranking_loss(log_quantiles[:, 0], target)
                output["loss"] = output["loss"] + self.ranking_weight * ranking
            if self.auxiliary_head is not None and labels.dim() == 2:
                auxiliary = self.auxiliary_head(pooled)  # [B, A]
                median_loss = 0.5 * (auxiliary - labels[:, 1:]).abs().mean()  # the pinball loss at 0.5
                output["loss"] = output["loss"] + self.auxiliary_weight * median_loss
        return output


def pinball_loss(predicted: torch.Tensor, target: torch.Tensor, quantiles: tuple[float, ...]) -> torch.Tensor:
    """Mean quantile (pinball) loss; at q = 0.5 it is half the L1 loss, whose minimiser is the median."""
    # predicted: [B, Q], target: [B]
    levels = torch.tensor(quantiles, dtype=predicted.dtype, device=predicted.device)  # [Q]
    error = target.unsqueeze(1) - predicted  # [B, Q]
    return torch.maximum(levels * error, (levels - 1) * error).mean()


def pairwise_ranking_loss(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """RankNet's logistic loss over every pair of the batch whose targets differ: a schedule needs the order of the
    lengths (which samples share a batch) more than their values. Zero when no pair differs."""
    # scores, target: [B]
    longer = target.unsqueeze(1) > target.unsqueeze(0)  # [B, B]: row i longer than column j
    if not longer.any():
        return scores.sum() * 0.0
    margins = scores.unsqueeze(1) - scores.unsqueeze(0)  # [B, B]
    return nn.functional.softplus(-margins[longer]).mean()
