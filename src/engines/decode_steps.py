"""The decode steps a static-cache engine (src.engines.static_cache) is built with: each `--engine` name of that engine
is one class here, named in `src.engines.registry.STATIC_CACHE_STEPS`.

A step says how a batch on a shape's static cache is decoded: by transformers' `generate` (`decodes_in_loop` False:
`compiled`), or by the engine's own loop (src.engines.decode_loop) calling `run` once per token (`graph`: the whole
step compiled; `captured`: the eager step captured in a CUDA graph). `generate_options` is what `generate` is told
wherever it runs a batch (every batch of `compiled`; sampled batches, and models the loop cannot decode, of the
others), and `compiling()` wraps every call that may compile.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Protocol

import torch
import torch.fx.experimental._config

from .decode_loop import DecodeSlot, EndTokens, decode_one_token


class DecodeStep(Protocol):
    decodes_in_loop: bool  # False: transformers' generate decodes every batch; True: the engine's loop calls run
    generate_options: dict  # what generate is told besides the static cache

    def compiling(self):
        """The context of every call that may compile (a no-op for a step that compiles nothing)."""

    def run(self, model, slot: DecodeSlot, end_tokens: EndTokens) -> None:
        """One decode step of every row of the slot, in place (the loop's steps only)."""


def compile_settings():
    """torch's symbolic-shape settings while a step compiles: duck sizing off. With it, dimensions of equal size get one
    symbol at the first compilation, so a first batch of 2 rows was tied to the test model's 2 KV heads and the next
    batch size compiled the model again; without it the first compilation is the only one (tested). Scoped to the
    engine's calls, not set for the whole process."""
    return torch.fx.experimental._config.patch(use_duck_shape=False)


def compiled_generate_options(device: torch.device) -> dict:
    """`generate`'s own compilation of its decode step: torch.compile with dynamic shapes, CUDA graphs on a GPU (mode
    reduce-overhead)."""
    from transformers import CompileConfig

    config = CompileConfig(dynamic=True, mode="reduce-overhead" if device.type == "cuda" else "default")
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told
    return {"compile_config": config}


class GenerateStep:
    """`compiled`: transformers' `generate` decodes every batch on the static cache, its step compiled."""

    decodes_in_loop = False

    def __init__(self, device: torch.device):
        self.generate_options = compiled_generate_options(device)

    def compiling(self):
        return compile_settings()

    def run(self, model, slot: DecodeSlot, end_tokens: EndTokens) -> None:
        raise RuntimeError("the compiled engine's step runs inside transformers' generate, not in the engine's loop")


class CompiledStep:
    """`graph`: `decode_one_token` compiled once for every shape (on CUDA torch.compile records each shape's CUDA
    graph); sampled batches go through `generate`, its step compiled the same way."""

    decodes_in_loop = True

    def __init__(self, device: torch.device):
        self.generate_options = compiled_generate_options(device)
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        self.compiled = torch.compile(decode_one_token, mode=mode, dynamic=True, fullgraph=True)

    def compiling(self):
        return compile_settings()

    def run(self, model, slot: DecodeSlot, end_tokens: EndTokens) -> None:
        torch.compiler.cudagraph_mark_step_begin()  # the previous replay's outputs are no longer read
        self.compiled(model, slot, end_tokens)


# Eager steps run on a side stream before a capture, as PyTorch advises: they create what a first call creates lazily
# (cuBLAS workspaces, cached tensors) outside the graph's memory pool
STEPS_BEFORE_CAPTURE = 3


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


def warm_up_decode_step(model, slot: DecodeSlot, end_tokens: EndTokens) -> torch.Tensor:
    """The step run STEPS_BEFORE_CAPTURE times mid-batch, each time from the batch's state and restored after it, so
    that every run writes its keys and values at the same cache position (within the cache, and overwritten by the
    batch's next step). Returns what the step chose: [B] tokens, then [B] finished, as a [2, B] tensor."""
    for _ in range(STEPS_BEFORE_CAPTURE):
        with state_restored(slot):
            decode_one_token(model, slot, end_tokens)
            chosen = torch.stack([slot.tokens[:, 0], slot.finished.long()])  # [2, B]
    return chosen


class CapturedStep:
    """`captured`: nothing compiled. On CUDA each shape's eager step is captured by `torch.cuda.graph` at its first
    decode step into a graph kept in the slot, and replayed from then on; elsewhere the step runs eagerly.

    Why: compiling a 7B model's step takes minutes on a GPU (docs/GPU.md), paid before the first answer. A CUDA graph of
    the eager kernels costs a capture per shape and removes the host's launches, which make eager decoding host-bound;
    it keeps every eager kernel (no fusion), so its step should sit between the eager engine's and the graph engine's.
    transformers' models skip their host-side checks while a stream is capturing, as while torch.compile traces. A
    shape's first replay is checked against the last warm-up step, which ran the same step eagerly from the same state:
    a capture that does not reproduce it stops the run instead of writing other answers. Sampled batches go through
    `generate`, told not to compile (on CUDA it would)."""

    decodes_in_loop = True
    generate_options = {"disable_compile": True}

    def __init__(self, device: torch.device):
        self.on_cuda = device.type == "cuda"

    def compiling(self):
        return nullcontext()

    def run(self, model, slot: DecodeSlot, end_tokens: EndTokens) -> None:
        if not self.on_cuda:
            decode_one_token(model, slot, end_tokens)
            return
        if slot.graphs:
            slot.graphs[0].replay()
            return
        graph, expected = self.capture(model, slot, end_tokens)
        graph.replay()
        replayed = torch.stack([slot.tokens[:, 0], slot.finished.long()])
        if not torch.equal(replayed, expected):
            raise RuntimeError(
                "the captured decode step chose other tokens than the same step run eagerly: run --engine graph or "
                "--engine compiled instead"
            )
        slot.graphs.append(graph)

    def capture(self, model, slot: DecodeSlot, end_tokens: EndTokens) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The slot's step as a CUDA graph, captured at its first decode step without changing the batch, and what the
        step chose when run eagerly from the same state. Each graph has its own memory pool, freed with it: a pool
        shared by every shape would outlive graphs dropped with their slots, which the allocator does not allow for
        (the step's logits and activations: a few MB at 16 rows of a 32000-token vocabulary, about 100 MB at 256)."""
        side_stream = torch.cuda.Stream()
        side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side_stream):
            expected = warm_up_decode_step(model, slot, end_tokens)
        torch.cuda.current_stream().wait_stream(side_stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            decode_one_token(model, slot, end_tokens)  # recorded, not run: the batch stays as it was
        return graph, expected
