"""The `captured` engine: the graph engine's decode loop with nothing compiled. Its eager step (the forward pass,
replayed lengths and EOS, the greedy choice, the token's record) is captured by `torch.cuda.graph` into one CUDA graph
per (rows, cache length) shape, at that shape's first decode step, and replayed from then on.

Why: on an H200, torch.compile took 150 s to compile the 7B shape's step, a third of the GPU table's 450 s budget
before its first sample. A CUDA graph of the eager kernels costs a capture per shape (no compilation) and removes
the host's launches, which make eager decoding host-bound; what it keeps is every eager kernel (no fusion), so its
step should sit between the eager engine's and the graph engine's. transformers' models are written to be captured
this way: their host-side checks are skipped while a stream is capturing, as while torch.compile traces.

A shape's first replay is checked against the last warm-up step, which ran the same step eagerly from the same state:
a capture that does not reproduce the eager step stops the run instead of writing other answers.

Elsewhere than on CUDA there is nothing to capture and the step runs eagerly, so the CPU tests check the loop and
the capture's bookkeeping (with stand-ins for CUDA's streams and graphs), not a capture itself. Sampling, and models
the loop cannot copy, go through transformers' `generate` on the static cache, told not to compile.
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

    graphs: list = field(default_factory=list, compare=False)  # [torch.cuda.CUDAGraph] once captured


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


def warm_up_decode_step(model, slot: DecodeSlot, end_tokens) -> torch.Tensor:
    """The step run STEPS_BEFORE_CAPTURE times mid-batch, each time from the batch's state and restored after it, so
    that every run writes its keys and values at the same cache position (within the cache, and overwritten by the
    batch's next step). Returns what the step chose: [B] tokens, then [B] finished, as a [2, B] tensor."""
    for _ in range(STEPS_BEFORE_CAPTURE):
        with state_restored(slot):
            decode_one_token(model, slot, end_tokens)
            chosen = torch.stack([slot.tokens[:, 0], slot.finished.long()])  # [2, B]
    return chosen


class CapturedEngine(GraphEngine):
    name = "captured"
    slot_class = CapturedSlot

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer)
        self.on_cuda = model.device.type == "cuda"  # elsewhere the step runs eagerly

    def _compile_decode_step(self):
        return None  # nothing is compiled: the step is captured per shape instead

    def _generate_options(self, cache) -> dict:
        return {"past_key_values": cache, "disable_compile": True}  # generate would compile its step on CUDA

    def _run_decode_step(self, slot: CapturedSlot) -> None:
        if not self.on_cuda:
            decode_one_token(self.model, slot, self.end_tokens)
            return
        if slot.graphs:
            slot.graphs[0].replay()
            return
        graph, expected = self._capture_decode_step(slot)
        graph.replay()
        replayed = torch.stack([slot.tokens[:, 0], slot.finished.long()])
        if not torch.equal(replayed, expected):
            raise RuntimeError(
                "the captured decode step chose other tokens than the same step run eagerly: run --engine graph or "
                "--engine compiled instead"
            )
        slot.graphs.append(graph)

    def _capture_decode_step(self, slot: CapturedSlot) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The slot's step as a CUDA graph, captured at its first decode step without changing the batch, and what the
        step chose when run eagerly from the same state. Each graph has its own memory pool, freed with it: a pool
        shared by every shape would outlive graphs dropped with their slots, which the allocator does not allow for
        (the step's logits and activations: a few MB at 16 rows of a 32000-token vocabulary, about 100 MB at 256)."""
        side_stream = torch.cuda.Stream()
        side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side_stream):
            expected = warm_up_decode_step(self.model, slot, self.end_tokens)
        torch.cuda.current_stream().wait_stream(side_stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            decode_one_token(self.model, slot, self.end_tokens)  # recorded, not run: the batch stays as it was
        return graph, expected
