"""What the training commands (train_lora, train_proxy) share."""

from __future__ import annotations

import torch


def right_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training batches: each row starts at column 0, padding and a zero mask after it."""
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # [B, T]
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
    return input_ids, attention_mask
