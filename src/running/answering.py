"""Answering a request file group by group (src.infer): each group's requests predicted, scheduled and generated
through the same `run_schedule` and executor as the benchmark, each final answer written as `run_schedule` reports it,
and the totals a summary is made of."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..common.answers import AnswerWriter, answer_row, error_row
from ..common.data import Sample
from ..common.request_file import Request
from ..common.utils import Timer
from ..engines.base import Engine
from ..predictors.registry import Predictor
from ..scheduling.metrics import data_order_token_slots
from ..scheduling.schedule import run_schedule
from .executor import StaticBatchExecutor
from .runner import predict_for_schedule, schedule_config
from .settings import RunSettings


@dataclass
class Totals:
    """What this process answered, for the summary."""

    requests: int = 0
    errors: int = 0
    generated_tokens: int = 0
    token_slots: int = 0
    data_order_token_slots: int = 0  # what the same requests would have cost batched in file order
    truncated: int = 0
    recomputed: int = 0
    prediction_s: float = 0.0
    generation_s: float = 0.0
    engine_warmup_s: float = 0.0
    oom_splits: int = 0


def groups_of(requests, group_size: int, default_cap: int, default_temperature: float):
    """(cap, temperature, requests) groups in file order: requests with the same sampling settings, at most
    `group_size` of them; a setting's group is yielded when it is full, and the rest at the end."""
    buffers: dict[tuple[int, float], list[Request]] = {}
    for request in requests:
        key = (
            request.max_tokens if request.max_tokens is not None else default_cap,
            request.temperature if request.temperature is not None else default_temperature,
        )
        buffers.setdefault(key, []).append(request)
        if len(buffers[key]) == group_size:
            yield (*key, buffers.pop(key))
    for key, members in buffers.items():
        yield (*key, members)


@dataclass
class Runner:
    """One process's model, predictor and executor, answering one group at a time into `writer`."""

    settings: RunSettings  # its one strategy, the batch size and the VBS table; caps and temperatures are per group
    predictor: Predictor
    formatter: object
    engine: Engine
    executor: StaticBatchExecutor
    writer: AnswerWriter
    context_length: int | None
    totals: Totals = field(default_factory=Totals)

    def answer_group(self, cap: int, temperature: float, requests: list[Request], progress) -> None:
        prompt_ids = self.encode_fitting(requests, cap, progress)
        if not prompt_ids:
            return
        self.executor.prompt_ids = prompt_ids
        self.executor.temperature = temperature
        strategy = self.settings.strategies[0]
        samples = [Sample(request.id, request.prompt, None) for request in requests if request.id in prompt_ids]
        with Timer(self.engine.device) as prediction_timer:
            predicted = predict_for_schedule(
                strategy, self.predictor, samples, cap, retry_levels=self.settings.retry_levels_of(strategy)
            )
        config = schedule_config(strategy, self.settings.batch_size, len(samples), cap, self.settings.vbs_table)
        warmup_before = self.engine.warmup_seconds
        with Timer(self.engine.device) as generation_timer:
            record = run_schedule(
                [sample.id for sample in samples],
                predicted.lengths,
                config,
                self.executor,
                self.progress_reporter(progress),
                caps=predicted.caps,
                retry_caps=predicted.retry_caps,
                on_result=self.answer_writer(prompt_ids, predicted.lengths),
            )
        warmup = self.engine.warmup_seconds - warmup_before
        self.count(record, prediction_timer.seconds, generation_timer.seconds - warmup, warmup)

    def encode_fitting(self, requests: list[Request], cap: int, progress) -> dict[str, list[int]]:
        """Each request's prompt tokens; one that leaves no room for `cap` new tokens in the model's context gets an
        error line instead."""
        prompt_ids = {}
        for request in requests:
            ids = self.formatter.encode_conversation(request.messages)
            if self.context_length is not None and len(ids) + cap > self.context_length:
                self.refuse(
                    request.id,
                    f"a prompt of {len(ids)} tokens and {cap} new tokens exceed the model's context of "
                    f"{self.context_length} tokens",
                    progress,
                )
                continue
            prompt_ids[request.id] = ids
        return prompt_ids

    def answer_writer(self, prompt_ids: dict[str, list[int]], predictions: dict[str, int]):
        def on_result(result, executed) -> None:  # a request's final answer: written with its batch
            self.writer.add(
                answer_row(
                    result.id,
                    result.text,
                    len(prompt_ids[result.id]),
                    result.length,
                    result.finished,
                    predictions[result.id],
                    executed.batch.attempt + 1,
                )
            )
            self.totals.generated_tokens += result.length

        return on_result

    def progress_reporter(self, progress):
        """After each batch: the written lines flushed, the bar moved on, and the group's tokens per second shown."""
        started, generated_before, done_before = time.perf_counter(), self.totals.generated_tokens, 0

        def on_batch(_executed, done) -> None:
            nonlocal done_before
            self.writer.flush()
            progress.update(done - done_before)
            done_before = done
            rate = (self.totals.generated_tokens - generated_before) / max(1e-9, time.perf_counter() - started)
            progress.set_postfix_str(f"{rate:.0f} tokens/s", refresh=False)

        return on_batch

    def count(self, record, prediction_seconds: float, generation_seconds: float, warmup: float) -> None:
        lengths = [result.length for result in record.results.values()]
        totals = self.totals
        totals.requests += len(record.results)
        totals.token_slots += sum(executed.token_slots for executed in record.batches)
        totals.data_order_token_slots += data_order_token_slots(lengths, self.settings.batch_size)
        totals.truncated += sum(not result.finished for result in record.results.values())
        totals.recomputed += sum(result.recomputed for result in record.results.values())
        totals.prediction_s += prediction_seconds
        totals.generation_s += generation_seconds
        totals.engine_warmup_s += warmup
        totals.oom_splits += sum(executed.oom_splits for executed in record.batches)

    def refuse(self, sample_id: str, message: str, progress) -> None:
        self.writer.add(error_row(sample_id, message))
        self.writer.flush()
        self.totals.errors += 1
        progress.update(1)
