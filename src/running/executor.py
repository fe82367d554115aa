"""The executor of static batches: one scheduled batch through the engine, and its outcome back to the scheduler.

A batch that runs out of memory is split in halves (src.engines.generate), and the outcome says which pieces ran.
Samples that resume (`Batch.resume_from`) are fed their prompt followed by the tokens they made before, and, where
the engine keeps per-row KV caches, those caches instead of a prefill (src.running.kept_rows). Everything the
executor measures of a batch (where its time went, the prompt tokens its kept caches served) comes back inside that
batch's `BatchOutcome.executor_fields`, so that no column can land on another batch's row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..common.stops import first_stop_token
from ..engines.base import Engine
from ..scheduling.schedule import Batch, BatchOutcome
from .kept_rows import KeptRows

if TYPE_CHECKING:
    from ..engines.generate import GeneratedSample

# A real batch row's clock readings (they differ from run to run; every other column is the schedule's)
BATCH_TIMING_FIELDS = (
    "elapsed_s",
    "prefill_s",
    "decode_s",
    "other_s",
    "warmup_s",
    "decode_steps_timed",
    "decode_ms_per_step",
    "first_steps_ms",
    "last_steps_ms",
)
# A real batch row's columns from the executor besides the clock: the prompt tokens whose KV cache it reused
BATCH_ENGINE_FIELDS = ("kv_reused_tokens",)


class StaticBatchExecutor:
    def __init__(
        self,
        engine: Engine,
        prompt_ids: dict[str, list[int]],
        temperature: float,
        replay: dict[str, int] | None,
        debug: bool = False,
        fail_above: int | None = None,
        top_p: float = 1.0,
    ):
        self.engine, self.prompt_ids, self.temperature, self.replay = engine, prompt_ids, temperature, replay
        self.debug, self.fail_above = debug, fail_above
        self.top_p = top_p  # the nucleus of sampling (temperature above 0); 1 samples from the whole distribution
        self.stops: dict[str, tuple[str, ...]] = {}  # sample id -> the stop strings its answer ends at
        self.kept = KeptRows(engine.device)

    def __call__(self, batch: Batch) -> BatchOutcome:
        from ..engines.generate import generate_splitting_on_oom

        call = _EngineCalls(self, batch)
        kept = self.kept.tokens_of(batch)
        prompts = [self.prompt_ids[sample_id] + tokens for sample_id, tokens in zip(batch.ids, kept, strict=True)]
        prefix_caches = self.kept.take_caches(batch, prompts) if self.engine.keeps_kv_caches else None
        replay_lengths = None
        if self.replay is not None:  # a resumed sample makes what its recorded length still lacks
            replay_lengths = [
                max(1, self.replay[sample_id] - len(tokens)) for sample_id, tokens in zip(batch.ids, kept, strict=True)
            ]
        generated = generate_splitting_on_oom(
            call.generate, prompts, replay_lengths, call.count_split, self.fail_above, prefix_caches
        )
        generated = [self._ended_at_stop(*member) for member in zip(batch.ids, kept, generated, strict=True)]
        texts = self._texts_and_kept_rows(batch, kept, generated, call.keep_caches)
        reused = sum(len(prompt) - 1 for prompt in prompts) if prefix_caches is not None else 0
        outcome = BatchOutcome(
            {sample_id: sample.length for sample_id, sample in zip(batch.ids, generated, strict=True)},
            {sample_id: sample.finished for sample_id, sample in zip(batch.ids, generated, strict=True)},
            texts,
            call.parts(batch.ids),
            call.splits,
            batch_timing_fields(call.timings) | {"kv_reused_tokens": reused},
        )
        if self.debug:
            kind = f"retry {batch.attempt}" if batch.recompute else "first"
            steps = max(outcome.lengths.values())
            print(f"batch group={batch.group} {kind} size={len(batch.ids)} cap={batch.max_new_tokens} steps={steps}")
        return outcome

    def _ended_at_stop(self, sample_id: str, kept_tokens: list[int], sample: GeneratedSample) -> GeneratedSample:
        """A row whose text holds one of its stop strings, as if it had ended at the token that completed it: the
        engine ran static rows on, but the scheduler sees a finished answer (no retry) of the length it needed."""
        stops = self.stops.get(sample_id)
        if not stops:
            return sample
        all_tokens = kept_tokens + sample.token_ids
        end = first_stop_token(all_tokens, self.decode, stops)
        if end is None:
            return sample
        from ..engines.generate import GeneratedSample

        new_tokens = all_tokens[len(kept_tokens) : max(end, len(kept_tokens) + 1)]
        return GeneratedSample(len(new_tokens), True, self.decode(new_tokens), new_tokens)

    def decode(self, token_ids: list[int]) -> str:
        return self.engine.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _texts_and_kept_rows(self, batch: Batch, kept, generated, keep_caches: bool) -> dict[str, str]:
        """Each member's text over all its tokens; what an unfinished member continues from is kept."""
        texts = {}
        for sample_id, tokens, sample in zip(batch.ids, kept, generated, strict=True):
            all_tokens = tokens + sample.token_ids
            if batch.length_limit is not None and len(all_tokens) > batch.length_limit:
                all_tokens = all_tokens[: batch.length_limit]  # cut at max_length, as the scheduler counts it
            texts[sample_id] = self.decode(all_tokens) if tokens else sample.text
            will_resume = keep_caches and len(all_tokens) < batch.resume_below
            self.kept.record_attempt(sample_id, all_tokens, sample.finished, sample.kv_cache, will_resume)
        return texts


class _EngineCalls:
    """The engine calls of one batch: one, or one per piece that an out-of-memory split ran, each with its timing."""

    def __init__(self, executor: StaticBatchExecutor, batch: Batch):
        self.executor, self.batch = executor, batch
        self.keep_caches = executor.engine.keeps_kv_caches and batch.resume_below is not None
        self.sizes: list[int] = []  # the rows of each call that completed, in order
        self.timings: list[tuple] = []  # (the engine's BatchTiming, the warm-up it paid) of each call
        self.splits = 0

    def count_split(self) -> None:
        self.splits += 1

    def generate(self, prompts, replay_lengths, prefix_caches):
        executor, engine = self.executor, self.executor.engine
        warmup_before = engine.warmup_seconds
        samples = engine.generate(
            prompts,
            self.batch.max_new_tokens,
            executor.temperature,
            replay_lengths,
            prefix_caches=prefix_caches,
            keep_caches=self.keep_caches,
            top_p=executor.top_p if executor.temperature > 0 else 1.0,
        )
        self.sizes.append(len(prompts))
        if engine.last_timing is not None:
            self.timings.append((engine.last_timing, engine.warmup_seconds - warmup_before))
        return samples

    def parts(self, ids: tuple[str, ...]) -> tuple[tuple[str, ...], ...] | None:
        """The pieces that ran, when the batch was split; None when it ran whole."""
        if len(self.sizes) < 2:
            return None
        pieces, start = [], 0
        for size in self.sizes:
            pieces.append(tuple(ids[start : start + size]))
            start += size
        return tuple(pieces)


def batch_timing_fields(timings: list) -> dict:
    """A batch row's timing columns, summed over the pieces an out-of-memory split ran: the engine's prefill, decode
    and other seconds, its decode steps and their mean cost (ms), the mean step of the first and the last tenth of
    the steps (how a step grows with the context), and the warm-up (compilation) the batch's first shape paid."""
    if not timings:
        return {}
    prefill = sum(timing.prefill_s for timing, _ in timings)
    decode = sum(timing.decode_s for timing, _ in timings)
    steps = sum(timing.decode_steps for timing, _ in timings)
    warmup = sum(seconds for _, seconds in timings)
    return {
        "prefill_s": prefill,
        "decode_s": decode,
        "other_s": sum(timing.wall_s for timing, _ in timings) - prefill - decode,
        "warmup_s": warmup,
        "decode_steps_timed": steps,
        "decode_ms_per_step": 1000 * decode / steps if steps else None,
        "first_steps_ms": timings[0][0].first_steps_ms,
        "last_steps_ms": timings[-1][0].last_steps_ms,
    }
