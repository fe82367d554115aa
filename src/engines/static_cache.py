"""The static-cache engine: bounded batch shapes, one kept static KV cache per shape, and a decode step chosen as a part
(src.engines.decode_steps): `compiled` (transformers' `generate`, its step compiled), `graph` (the engine's own loop,
the whole step compiled) or `captured` (the same loop, the eager step captured in a CUDA graph). Each of those
`--engine` names is this one class with another step; a new step is one class in decode_steps.py.

Eager decoding of a large model in small batches is bound by Python and the host's kernel launches, not by reading the
weights; a CUDA graph replays a whole step in one launch. Compilation and capture are paid per shape, so
shapes are bounded: a batch's rows are rounded up to a power of two, at least 2 (filler rows of one token end at their
first step, and their results are dropped), and its cache length up to a multiple of `CACHE_LENGTH_STEP`. Each new
(rows, cache length) shape costs one warm-up on filler prompts (CUDA graphs are recorded per shape), timed in
`warmup_seconds` and kept out of every throughput. The slots are kept per shape, so a replayed graph finds its cache
at the same address, and the least recently used ones are dropped when they would take more than their share of the
memory that was free when the engine started (`memory.COMPILED_STATIC_CACHES`).

A resumed row's kept KV cache is copied into the static cache instead of being prefilled again. Continuous batching
is transformers' manager (src.engines.continuous), which captures its own CUDA graphs.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

import torch

from ..common.memory import COMPILED_STATIC_CACHES, budget_bytes
from ..common.models import kv_cache_bytes_per_token
from .base import DEFAULT_CONTINUOUS_SPEED, ContinuousOutcome, EngineBase, QueueResult
from .continuous import run_continuous
from .decode_loop import DecodeSlot, EndTokens, decode_steps, loop_decodes, prefill_slot
from .decode_steps import DecodeStep
from .generate import (
    TIMED_STEPS,
    GeneratedSample,
    StepClock,
    eos_token_ids_of,
    generate_batch,
    samples_from_output,
    time_decode_step,
)

# Cache lengths are multiples of this: a longer step wastes attention over empty positions, a shorter one compiles
# (records) more shapes. 128 keeps a batch of max length 512 within 25 % of its need.
CACHE_LENGTH_STEP = 128
# New tokens of a shape's warm-up: CUDA graph trees run a new shape once eagerly, record it on the second call and
# replay it from the third.
WARMUP_TOKENS = 4


def padded_rows(rows: int) -> int:
    """The batch size a shape is run at for `rows` rows: the next power of two, at least 2 (2, 4, ..., 256).
    torch.compile specialises a dimension of size 1, so a single row would compile the whole model a second time."""
    return max(2, 1 << max(0, rows - 1).bit_length())


def cache_length(tokens: int) -> int:
    """The static cache length that holds `tokens` (prompt width + new tokens): the next multiple of the step."""
    return max(1, -(-tokens // CACHE_LENGTH_STEP)) * CACHE_LENGTH_STEP


class StaticCacheEngine(EngineBase):
    # generate() hands back each unfinished row's cache cut out of the static one, and copies kept rows back into it,
    # so that a resumed FCR failure skips its prefill as on the eager engine
    keeps_kv_caches = True

    def __init__(self, model, tokenizer, name: str, step: DecodeStep):
        super().__init__(model, tokenizer)
        self.name, self.step = name, step
        self.eos_token_ids = eos_token_ids_of(model, tokenizer)
        self.decodes_itself = step.decodes_in_loop and loop_decodes(model)
        self.end_tokens: EndTokens | None = None  # built once, at the first prefill, from its logits' vocabulary
        self.caches: OrderedDict[tuple[int, int], DecodeSlot] = OrderedDict()  # (rows, length) -> slot, LRU first
        self.bytes_per_token = kv_cache_bytes_per_token(model) or 0
        self.cache_budget_bytes = budget_bytes(COMPILED_STATIC_CACHES, model.device)
        self.filler_prompt = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else self.eos_token_ids[0]]
        self.warmed_shapes: list[tuple[int, int]] = []  # in the order they were first prepared
        self._random_prompts = torch.Generator().manual_seed(0)  # decode_step_seconds' prompts, the same every run

    def _kept_bytes(self) -> int:
        return sum(rows * length * self.bytes_per_token for rows, length in self.caches)

    def _slot_for(self, rows: int, length: int) -> DecodeSlot:
        """The kept slot of this shape, or a new one after a timed warm-up on filler prompts."""
        key = (rows, length)
        if key in self.caches:
            self.caches.move_to_end(key)
            return self.caches[key]
        if self.cache_budget_bytes is not None:
            needed = rows * length * self.bytes_per_token
            while self.caches and self._kept_bytes() + needed > self.cache_budget_bytes:
                self.caches.popitem(last=False)
        slot = self.caches[key] = DecodeSlot.allocate(self.model, rows, length)
        start = time.perf_counter()
        try:
            self._run([self.filler_prompt] * rows, WARMUP_TOKENS, 0.0, [WARMUP_TOKENS] * rows, slot)
        except BaseException:  # out of memory: the executor splits the batch, and this shape is not kept
            del self.caches[key]
            raise
        finally:
            self.warmup_seconds += time.perf_counter() - start
        self.warmed_shapes.append(key)
        return slot

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
        slot = self._slot_for(rows, cache_length(width + max_new_tokens))
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
            padded, max_new_tokens, temperature, lengths, slot, clock, top_p, prefix_caches, keep_caches
        )
        self.last_timing = clock.timing(time.perf_counter() - start)
        return samples[: len(prompts)]

    def _run(
        self,
        prompts,
        max_new_tokens,
        temperature,
        replay_lengths,
        slot: DecodeSlot,
        clock=None,
        top_p: float = 1.0,
        prefix_caches=None,
        keep_caches: bool = False,
    ) -> list[GeneratedSample]:
        """One padded batch on the slot: through `generate` (sampling, a step decoded by generate, a model the loop
        cannot decode) or the engine's loop."""
        with self.step.compiling():
            if temperature > 0 or not self.decodes_itself:
                slot.cache.reset()  # a kept cache still holds the previous batch; generate reads its length from it
                return generate_batch(
                    self.model,
                    self.tokenizer,
                    prompts,
                    max_new_tokens,
                    temperature,
                    replay_lengths,
                    self.eos_token_ids,
                    clock,
                    {"past_key_values": slot.cache, **self.step.generate_options},
                    inference_mode=False,  # transformers' compiled decoding runs under no_grad, as generate does
                    prefix_caches=prefix_caches,
                    keep_caches=keep_caches,
                    top_p=top_p,
                )
            with torch.no_grad():
                return self._decode_in_loop(prompts, max_new_tokens, replay_lengths, slot, clock, prefix_caches,
                                            keep_caches)  # fmt: skip

    def _decode_in_loop(self, prompts, max_new_tokens, replay_lengths, slot, clock, prefix_caches, keep_caches):
        pad_token_id = self.tokenizer.pad_token_id
        input_ids = prefill_slot(
            self.model, slot, prompts, pad_token_id, replay_lengths, prefix_caches, self._end_tokens
        )  # [B, W]
        if clock is not None:
            clock.mark_step()
        every_row_replayed = replay_lengths is not None and None not in replay_lengths
        steps = max_new_tokens - 1
        if every_row_replayed:  # every row ends at its replayed length: the step count is known
            steps = min(steps, max(max(1, int(length)) for length in replay_lengths) - 1)

        def run_step(decoded: DecodeSlot) -> None:
            self.step.run(self.model, decoded, self.end_tokens)

        steps_run = decode_steps(run_step, slot, steps, not every_row_replayed, clock)
        output = torch.cat([input_ids, slot.generated[:, : 1 + steps_run]], dim=1)  # [B, W + T]
        cache = slot.cache if keep_caches else None
        return samples_from_output(self.tokenizer, output, input_ids.shape[1], prompts, self.eos_token_ids, cache)

    def _end_tokens(self, vocabulary: int) -> EndTokens:
        if self.end_tokens is None:
            self.end_tokens = EndTokens.of(
                self.eos_token_ids, vocabulary, self.model.device, self.tokenizer.pad_token_id
            )
        return self.end_tokens

    def decode_step_seconds(self, batch_size: int, context: int) -> float:
        for new_tokens in (1, 1 + TIMED_STEPS):  # both timed calls' shapes, warmed up outside the timing
            self._slot_for(padded_rows(batch_size), cache_length(context + new_tokens))
        vocabulary = self.model.config.get_text_config().vocab_size
        return time_decode_step(self.generate, vocabulary, batch_size, context, self._random_prompts)

    def run_queue(
        self,
        order: list[str],
        prompt_ids: dict[str, list[int]],
        max_length: int,
        slots: int,
        temperature: float = 0.0,
        replay: dict[str, int] | None = None,
        on_result: Callable[[QueueResult], None] | None = None,
        seed: int | None = None,
        speed: str = DEFAULT_CONTINUOUS_SPEED,
        top_p: float = 1.0,
        stops: dict[str, tuple[str, ...]] | None = None,
    ) -> ContinuousOutcome:
        # the manager runs every row to its EOS or cap: stop strings are left to the caller's cut
        return run_continuous(
            self.model, self.tokenizer, order, prompt_ids, max_length, slots, temperature, replay, on_result, seed,
            speed, top_p,
        )  # fmt: skip
