"""The `captured` engine: the graph engine's decode loop with nothing compiled. Its eager step (the forward pass,
replayed lengths and EOS, the greedy choice, the token's record) is captured by `torch.cuda.graph` into one CUDA graph
per (rows, cache length) shape, at that shape's first decode step, and replayed from then on.

Why: on an H200, torch.compile took 150 s to compile the 7B shape's step, which alone is most of a GPU session's
budget for the whole table. A CUDA graph of the eager kernels costs a capture per shape (no compilation) and removes
the host's launches, which make eager decoding host-bound; what it keeps is every eager kernel (no fusion), so its
step should sit between the eager engine's and the graph engine's. transformers' models are written to be captured
this way: their host-side checks are skipped while a stream is capturing, as while torch.compile traces.

Elsewhere than on CUDA there is nothing to capture and the step runs eagerly, so the CPU tests check the loop and the
capture's bookkeeping, not the capture itself. Sampling, and models the loop cannot copy, go through `generate` as on
the graph engine (there with transformers' compiled step).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .graph import DecodeSlot, GraphEngine, decode_one_token

# Eager steps run on a side stream before a capture, as PyTorch advises: they create what a first call creates lazily
# (cuBLAS workspaces, cached tensors) outside the graph's memory pool
STEPS_BEFORE_CAPTURE = 3


@dataclass(frozen=True)
class CapturedSlot(DecodeSlot):
    """A graph engine's slot that also keeps its step's CUDA graph, captured on the slot's own tensors: the graph lives
    and is dropped with the slot (a graph replayed on a dropped slot's memory would write into whatever holds it)."""

    graphs: list = field(default_factory=list)  # [torch.cuda.CUDAGraph] once captured


def step_state(slot: DecodeSlot) -> list[torch.Tensor]:
    """Every tensor a decode step changes besides what it writes at the batch's next position (the keys and values of
    the cache's next column, the token's column of `generated`), which the batch's next step overwrites: the slot's
    own and each cache layer's length."""
    lengths = [layer.cumulative_length for layer in slot.cache.layers]
    return [slot.tokens, slot.positions, slot.step, slot.finished, *lengths]


@contextmanager
def state_restored(slot: DecodeSlot):
    """Whatever decode steps run inside leave the batch as it was: their state is put back on the way out."""
    state = step_state(slot)
    saved = [tensor.clone() for tensor in state]
    yield
    for tensor, value in zip(state, saved, strict=True):
        tensor.copy_(value)


def warm_up_decode_step(model, slot: DecodeSlot, end_tokens) -> None:
    """The step run STEPS_BEFORE_CAPTURE times mid-batch, each time from the batch's state and restored after it, so
    that every run writes its keys and values at the same cache position (within the cache, and overwritten by the
    batch's next step)."""
    for _ in range(STEPS_BEFORE_CAPTURE):
        with state_restored(slot):
            decode_one_token(model, slot, end_tokens)


class CapturedEngine(GraphEngine):
    name = "captured"
    slot_class = CapturedSlot

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer)
        # one memory pool for every shape's graph, since graphs replay one at a time and keep no outputs of their own
        # (the step writes into the slot); None where there is no CUDA, and the step runs eagerly
        self.graph_pool = torch.cuda.graph_pool_handle() if model.device.type == "cuda" else None

    def _compile_decode_step(self):
        return None  # nothing is compiled: the step is captured per shape instead

    def _run_decode_step(self, slot: CapturedSlot) -> None:
        if self.graph_pool is None:
            decode_one_token(self.model, slot, self.end_tokens)
            return
        if not slot.graphs:
            slot.graphs.append(self._capture_decode_step(slot))
        slot.graphs[0].replay()

    def _capture_decode_step(self, slot: CapturedSlot) -> torch.cuda.CUDAGraph:
        """The slot's step as a CUDA graph, captured at its first decode step without changing the batch."""
        side_stream = torch.cuda.Stream()
        side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side_stream):
            warm_up_decode_step(self.model, slot, self.end_tokens)
        torch.cuda.current_stream().wait_stream(side_stream)
        graph = torch.cuda.CUDAGraph()
        with state_restored(slot), torch.cuda.graph(graph, pool=self.graph_pool):
            decode_one_token(self.model, slot, self.end_tokens)  # recorded, not run
        return graph
