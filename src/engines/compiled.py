"""The `compiled` engine: transformers' `generate` on a static KV cache with its decode step compiled by `torch.compile`
(CUDA graphs on a GPU, mode reduce-overhead), through `generate`'s own options (`past_key_values`, `compile_config`).

Eager decoding of a 7B model at batch 16 spends 10 to 15 times the time that reading the weights takes, in Python and
kernel launches; a CUDA graph replays a whole step in one launch. Compilation is paid per shape, so shapes are
bounded: a batch's rows are rounded up to a power of two, at least 2 (filler rows of one token end at their first
step, and their results are dropped), and its cache length up to a multiple of `CACHE_LENGTH_STEP`. The step is
compiled once with dynamic shapes; each new (rows, cache length) pair then costs one warm-up (CUDA graphs are recorded
per shape), run here on filler prompts, timed in `warmup_seconds` and kept out of every throughput. The caches are
kept per shape, so a replayed graph finds its cache at the same address, and the least recently used ones are dropped
when they would take more than their share of the memory that was free when the engine started
(`memory.COMPILED_STATIC_CACHES`).

A resumed row's kept KV cache is copied into the static cache instead of being prefilled again.

Continuous batching is the `transformers` engine's (transformers' manager captures its own CUDA graphs).
"""

from __future__ import annotations

import time
from collections import OrderedDict

import torch
import torch.fx.experimental._config

from ..common.memory import COMPILED_STATIC_CACHES, budget_bytes
from ..common.models import kv_cache_bytes_per_token
from .eager import TIMED_STEPS, TransformersEngine
from .generate import GeneratedSample, StepClock, generate_batch

# Cache lengths are multiples of this: a longer step wastes attention over empty positions, a shorter one compiles
# (records) more shapes. 128 keeps a batch of max length 512 within 25 % of its need.
CACHE_LENGTH_STEP = 128
# New tokens of a shape's warm-up: CUDA graph trees run a new shape once eagerly, record it on the second call and
# replay it from the third.
WARMUP_TOKENS = 4


def padded_rows(rows: int) -> int:
    """The compiled batch size of `rows` rows: the next power of two, at least 2 (2, 4, ..., 256). torch.compile
    specialises a dimension of size 1, so a single row would compile the whole model a second time."""
    return max(2, 1 << max(0, rows - 1).bit_length())


def cache_length(tokens: int) -> int:
    """The static cache length that holds `tokens` (prompt width + new tokens): the next multiple of the step."""
    return max(1, -(-tokens // CACHE_LENGTH_STEP)) * CACHE_LENGTH_STEP


class CompiledEngine(TransformersEngine):
    name = "compiled"
    # generate() hands back each unfinished row's cache cut out of the static one, and copies kept rows back into it,
    # so that a resumed FCR failure skips its prefill as on the eager engine
    keeps_kv_caches = True

    def __init__(self, model, tokenizer):
        from transformers import CompileConfig

        super().__init__(model, tokenizer)
        on_cuda = model.device.type == "cuda"
        # dynamic: one compilation serves every shape (CUDA graphs are still recorded per shape). Duck sizing gives
        # dimensions of equal size one symbol at the first compilation, so a first batch of 2 rows was tied to the
        # test model's 2 KV heads and the next batch size compiled the model again (as the H200 run did, 92 s, at its
        # first batch of 16 rows: not rerun since); without it the first compilation is the only one (tested)
        torch.fx.experimental._config.use_duck_shape = False
        self.compile_config = CompileConfig(dynamic=True, mode="reduce-overhead" if on_cuda else "default")
        self.compile_config._compile_all_devices = True  # transformers compiles only on accelerators unless told
        self.caches: OrderedDict[tuple[int, int], object] = OrderedDict()  # (rows, length) -> StaticCache, LRU first
        self.bytes_per_token = kv_cache_bytes_per_token(model) or 0
        self.cache_budget_bytes = budget_bytes(COMPILED_STATIC_CACHES, model.device)
        self.filler_prompt = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else self.eos_token_ids[0]]
        self.warmed_shapes: list[tuple[int, int]] = []  # in the order they were first prepared

    def _cache_bytes(self, rows: int, length: int) -> int:
        return rows * length * self.bytes_per_token

    def _kept_bytes(self) -> int:
        return sum(self._cache_bytes(*shape) for shape in self.caches)

    def _new_cache(self, rows: int, length: int):
        """What a shape keeps between batches: here its static cache (allocated at its first prefill)."""
        from transformers import StaticCache

        return StaticCache(config=self.model.config, max_cache_len=length)

    def _cache_for(self, rows: int, length: int):
        """The kept cache of this shape, or a new one after a timed warm-up on filler prompts."""
        key = (rows, length)
        if key in self.caches:
            self.caches.move_to_end(key)
            return self.caches[key]
        if self.cache_budget_bytes is not None:
            needed = self._cache_bytes(rows, length)
            while self.caches and self._kept_bytes() + needed > self.cache_budget_bytes:
                self.caches.popitem(last=False)
        cache = self._new_cache(rows, length)
        self.caches[key] = cache
        start = time.perf_counter()
        try:
            self._run([self.filler_prompt] * rows, WARMUP_TOKENS, 0.0, [WARMUP_TOKENS] * rows, cache)
        except BaseException:  # out of memory: the executor splits the batch, and this shape is not kept
            del self.caches[key]
            raise
        finally:
            self.warmup_seconds += time.perf_counter() - start
        self.warmed_shapes.append(key)
        return cache

    def _generate_options(self, cache) -> dict:
        """What `generate` is given besides the batch: the shape's static cache, and how to compile its step."""
        return {"past_key_values": cache, "compile_config": self.compile_config}

    def _run(
        self,
        prompts,
        max_new_tokens,
        temperature,
        replay_lengths,
        cache,
        clock=None,
        top_p: float = 1.0,
        prefix_caches=None,
        keep_caches: bool = False,
    ) -> list[GeneratedSample]:
        cache.reset()  # a kept cache still holds the previous batch; generate reads its length from the cache
        return generate_batch(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens,
            temperature,
            replay_lengths,
            self.eos_token_ids,
            clock,
            self._generate_options(cache),
            inference_mode=False,  # transformers' compiled decoding runs under no_grad, as its own generate does
            prefix_caches=prefix_caches,
            keep_caches=keep_caches,
            top_p=top_p,
        )

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        replay_lengths: list[int] | None = None,
        prefix_caches: list[tuple] | None = None,
        keep_caches: bool = False,
        top_p: float = 1.0,
    ) -> list[GeneratedSample]:
        rows = padded_rows(len(prompts))
        width = max(len(prompt) for prompt in prompts)
        cache = self._cache_for(rows, cache_length(width + max_new_tokens))
        fillers = rows - len(prompts)
        lengths = list(replay_lengths) if replay_lengths is not None else [None] * len(prompts)
        lengths += [1] * fillers  # a filler row ends at its first token and never holds the batch open
        if replay_lengths is None and not fillers:
            lengths = None
        start = time.perf_counter()
        clock = StepClock(self.model.device)
        padded = prompts + [self.filler_prompt] * fillers
        if prefix_caches is not None:  # a filler's one-token prompt has nothing before its last token
            empty = tuple((keys[:, :, :0], values[:, :, :0]) for keys, values in prefix_caches[0])
            prefix_caches = list(prefix_caches) + [empty] * fillers
        samples = self._run(
            padded, max_new_tokens, temperature, lengths, cache, clock, top_p, prefix_caches, keep_caches
        )
        self.last_timing = clock.timing(time.perf_counter() - start)
        return samples[: len(prompts)]

    def decode_step_seconds(self, batch_size: int, context: int) -> float:
        for new_tokens in (1, 1 + TIMED_STEPS):  # both timed calls' shapes, compiled outside the timing
            self._cache_for(padded_rows(batch_size), cache_length(context + new_tokens))
        return super().decode_step_seconds(batch_size, context)
