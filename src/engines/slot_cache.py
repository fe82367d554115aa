"""The slots engine's KV cache: every row's keys and values of every layer in one preallocated tensor ([S, H, L, D]),
written one column per decode step, the same column for every row.

It implements transformers' cache interface so that the model's own forward pass writes into it; the engine
(slots.py) places prefilled prompts in rows, moves the live columns left when the dead ones pile up, and drops rows
that are no longer needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass
class WriteColumn:
    """The cache column every row writes at the next step, shared by every layer of one `SlotCache`."""

    index: int


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values of every row ([S, H, L, D], allocated once): a decode step writes its one new
    column in place and attends over the columns before it and itself."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, column: WriteColumn):
        super().__init__()
        self.keys, self.values, self.column = keys, values, column
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass  # allocated up front, at the slots' shape

    def update(self, key_states, value_states, *args, **kwargs):
        # key_states: [S, H, 1, D]
        at = self.column.index
        self.keys[:, :, at : at + 1].copy_(key_states)
        self.values[:, :, at : at + 1].copy_(value_states)
        return self.keys[:, :, : at + 1], self.values[:, :, : at + 1]

    def get_seq_length(self) -> int:
        return self.column.index

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.column.index + query_length, 0

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class SlotCache(Cache):
    """transformers' cache interface over the slot layers; the engine passes every step's 4D mask itself."""

    def __init__(self, layers: list[SlotLayer], column: WriteColumn):
        super().__init__(layers=layers)
        self.column = column

    @classmethod
    def allocate(cls, model, rows: int, length: int) -> SlotCache:
        config = model.config.get_text_config()
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        parameter = next(model.parameters())
        column = WriteColumn(0)

        def zeros():  # [S, H, L, D]
            return torch.zeros((rows, heads, length, head_dim), dtype=parameter.dtype, device=parameter.device)

        return cls([SlotLayer(zeros(), zeros(), column) for _ in range(config.num_hidden_layers)], column)

    @property
    def rows(self) -> int:
        return self.layers[0].keys.shape[0]

    @property
    def length(self) -> int:
        return self.layers[0].keys.shape[2]

    def place(self, row: int, keys_and_values: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """A prefilled prompt's keys and values (per layer [H, P, D]) into `row`, ending before the write column."""
        end = self.column.index
        for layer, (keys, values) in zip(self.layers, keys_and_values, strict=True):
            layer.keys[row, :, end - keys.shape[1] : end].copy_(keys)
            layer.values[row, :, end - values.shape[1] : end].copy_(values)

    def move_columns(self, first: int, new_end: int) -> None:
        """Columns [first, write column) of every row move to end just before `new_end`, the new write column."""
        end = self.column.index
        width = end - first
        for layer in self.layers:
            for tensor in (layer.keys, layer.values):
                tensor[:, :, new_end - width : new_end] = tensor[:, :, first:end].clone()
        self.column.index = new_end

    def keep_rows(self, rows: list[int]) -> None:
        """Only these rows stay, in this order: a smaller cache, so that later steps compute fewer rows."""
        index = torch.tensor(rows, device=self.layers[0].keys.device)
        for layer in self.layers:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
