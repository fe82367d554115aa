"""The `transformers` engine: static batches through transformers' eager `generate`, continuous batching through its
`ContinuousBatchingManager` (src.continuous), and decode steps timed through `generate` for VBS auto."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .continuous import ContinuousOutcome, run_continuous
from .generate import GeneratedSample, eos_token_ids_of, generate_batch
from .utils import Timer

# Decode steps per timing in `decode_step_seconds`: enough to average out the first step's allocations.
TIMED_STEPS = 8


class TransformersEngine:
    name = "transformers"

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.device = str(model.device)
        self.eos_token_ids = eos_token_ids_of(model, tokenizer)
        self._random_prompts = torch.Generator().manual_seed(0)  # the calibration's prompts, the same every run

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        replay_lengths: list[int] | None = None,
    ) -> list[GeneratedSample]:
        return generate_batch(
            self.model, self.tokenizer, prompts, max_new_tokens, temperature, replay_lengths, self.eos_token_ids
        )

    def run_queue(
        self,
        order: list[str],
        prompt_ids: dict[str, list[int]],
        max_length: int,
        slots: int,
        temperature: float = 0.0,
        replay: dict[str, int] | None = None,
        on_result: Callable[[int], None] | None = None,
        seed: int | None = None,
    ) -> ContinuousOutcome:
        return run_continuous(
            self.model, self.tokenizer, order, prompt_ids, max_length, slots, temperature, replay, on_result, seed
        )

    def decode_step_seconds(self, batch_size: int, context: int) -> float:
        """Random prompts of `context` ordinary tokens; one generate of 1 token and one of 1 + TIMED_STEPS, so that
        the prefill cancels out. No EOS can end a run early (min_new_tokens)."""
        vocabulary = self.model.config.get_text_config().vocab_size
        # input_ids: [B, context]
        input_ids = torch.randint(100, vocabulary, (batch_size, context), generator=self._random_prompts)
        input_ids = input_ids.to(self.model.device)
        timings = []
        for new_tokens in (1, 1 + TIMED_STEPS):
            with Timer(self.device) as timer, torch.inference_mode():
                self.model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
            timings.append(timer.seconds)
        return max(1e-9, (timings[1] - timings[0]) / TIMED_STEPS)
