"""The `transformers` engine: static batches through transformers' eager `generate`, continuous batching through its
`ContinuousBatchingManager` (src.engines.continuous), and decode steps timed through `generate` for VBS auto."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .base import DEFAULT_CONTINUOUS_SPEED, ContinuousOutcome, EngineBase, QueueResult
from .continuous import run_continuous
from .generate import GeneratedSample, StepClock, eos_token_ids_of, generate_batch, time_decode_step


class TransformersEngine(EngineBase):
    name = "transformers"
    # generate() takes and returns rows' KV caches (prefix_caches, keep_caches), so that a resumed FCR failure skips
    # its prefill
    keeps_kv_caches = True

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer)
        self.eos_token_ids = eos_token_ids_of(model, tokenizer)
        self._random_prompts = torch.Generator().manual_seed(0)  # the calibration's prompts, the same every run

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
        start = time.perf_counter()
        clock = StepClock(self.model.device)
        samples = generate_batch(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens,
            temperature,
            replay_lengths,
            self.eos_token_ids,
            clock,
            prefix_caches=prefix_caches,
            keep_caches=keep_caches,
            top_p=top_p,
        )
        self.last_timing = clock.timing(time.perf_counter() - start)
        return samples

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

    def decode_step_seconds(self, batch_size: int, context: int) -> float:
        vocabulary = self.model.config.get_text_config().vocab_size
        return time_decode_step(self.generate, vocabulary, batch_size, context, self._random_prompts)
