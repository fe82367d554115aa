"""Answering a request file group by group (src.infer): each group's requests predicted, scheduled and generated
through the same `run_schedule` and executor as the benchmark, each final answer written as `run_schedule` reports it,
and the totals a summary is made of."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from ..common.answers import AnswerWriter, answer_row, error_row
from ..common.data import Sample
from ..common.request_file import Request, read_requests
from ..common.stops import cut_at_stop, holds_stop
from ..common.utils import Timer, set_seed
from ..engines.base import Engine
from ..predictors.registry import Predictor
from ..scheduling.continuous import admission_order, simulate_continuous
from ..scheduling.cost_model import DeviceCosts, data_order_seconds
from ..scheduling.metrics import data_order_token_slots
from ..scheduling.schedule import run_schedule
from .cost_estimate import estimated_seconds, final_lengths
from .executor import StaticBatchExecutor
from .plan import Planner, describe_choice
from .runner import predict_for_schedule, schedule_config
from .settings import RunSettings


class _Answered(NamedTuple):
    length: int
    finished: bool


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
    latency_sum_s: float = 0.0  # over the answers: seconds from the first group's start to the answer's line
    estimated_s: float = 0.0  # generation as the cost model of --device-profile sees the groups that ran
    data_order_estimated_s: float = 0.0  # the same, had they run as plain batches in file order
    device_profile: str | None = None  # the cost model's name, once a group was estimated
    plans: dict[str, int] = field(default_factory=dict)  # strategy label -> the groups it answered


class GroupSettings(NamedTuple):
    """What a group's requests share: their cap and sampling settings (each a record's own, or the run's flag)."""

    cap: int
    temperature: float
    top_p: float
    seed: int  # the seed its draws start from: its records' own, else the run's --seed


def groups_of(requests, group_size: int, defaults: GroupSettings):
    """(GroupSettings, requests) groups in file order: requests with the same settings, at most `group_size` of them;
    a setting's group is yielded when it is full, and the rest at the end."""
    buffers: dict[GroupSettings, list[Request]] = {}
    for request in requests:
        key = GroupSettings(
            request.max_tokens if request.max_tokens is not None else defaults.cap,
            request.temperature if request.temperature is not None else defaults.temperature,
            request.top_p if request.top_p is not None else defaults.top_p,
            request.seed if request.seed is not None else defaults.seed,
        )
        buffers.setdefault(key, []).append(request)
        if len(buffers[key]) == group_size:
            yield key, buffers.pop(key)
    yield from buffers.items()


@dataclass
class Runner:
    """One process's model, predictor and executor, answering one group at a time into `writer`."""

    settings: RunSettings  # its strategy (the default plan's candidates), the batch size and the VBS table; caps and
    # temperatures are per group
    predictor: Predictor
    formatter: object
    engine: Engine
    executor: StaticBatchExecutor
    writer: AnswerWriter
    context_length: int | None
    totals: Totals = field(default_factory=Totals)
    started: float | None = None  # when the first group began, the clock of every answer's latency
    device_costs: DeviceCosts | None = None  # --device-profile's cost model; None: no estimate
    planner: Planner | None = None  # the default plan: each group's strategy the cheapest of settings.strategies
    plan_reason: str = ""  # why the planner's candidates are those, said with each group's choice
    last_plan: str | None = None  # the strategy of the group before, so that a line says only a change

    def answer_group(self, group: GroupSettings, requests: list[Request], progress) -> None:
        if self.started is None:
            self.started = time.perf_counter()
        cap = group.cap
        prompt_ids = self.encode_fitting(requests, cap, progress)
        if not prompt_ids:
            return
        self.executor.prompt_ids = prompt_ids
        self.executor.temperature, self.executor.top_p = group.temperature, group.top_p
        self.executor.stops = {request.id: request.stop for request in requests if request.stop}
        set_seed(group.seed)  # a group's draws depend on its requests and its seed, not on the groups before it
        samples = [Sample(request.id, request.prompt, None) for request in requests if request.id in prompt_ids]
        with Timer(self.engine.device) as prediction_timer:
            strategy, predicted = self.plan(samples, cap, prompt_ids, progress)
        self.totals.plans[strategy.label] = self.totals.plans.get(strategy.label, 0) + 1
        if self.writer.openai_output is not None:  # an OpenAI line's system_fingerprint names the plan that made it
            self.writer.openai_output.strategy = strategy.label
        ids = [sample.id for sample in samples]
        warmup_before = self.engine.warmup_seconds
        with Timer(self.engine.device) as generation_timer:
            if strategy.continuous:
                order, outcome = self.answer_queue(strategy, ids, group, prompt_ids, predicted.lengths, progress)
                record = simulate_continuous(order, outcome.lengths, self.settings.batch_size, cap)
                slots = self.count_continuous(record, outcome.finished)
            else:
                record = self.answer_static(strategy, ids, cap, prompt_ids, predicted, progress)
                slots = self.count_static(record)
        warmup = self.engine.warmup_seconds - warmup_before
        self.totals.prediction_s += prediction_timer.seconds
        self.totals.generation_s += generation_timer.seconds - warmup
        self.totals.engine_warmup_s += warmup
        self.totals.token_slots += slots
        self.estimate(ids, record, prompt_ids)

    def plan(self, samples: list[Sample], cap: int, prompt_ids, progress):
        """The group's strategy and its predictions: the one strategy, or the planner's cheapest (said in a line
        where it differs from the previous group's of this process; the main process's only, which shows the bar)."""
        if self.planner is None:
            strategy = self.settings.strategies[0]
            retry_levels = self.settings.retry_levels_of(strategy)
            return strategy, predict_for_schedule(strategy, self.predictor, samples, cap, retry_levels=retry_levels)
        tokens = {sample.id: len(prompt_ids[sample.id]) for sample in samples}
        choice = self.planner.choose(self.predictor, samples, cap, tokens)
        if not progress.disable and choice.strategy.label != self.last_plan:
            progress.write(describe_choice(choice, len(samples), self.plan_reason), file=sys.stderr)
        self.last_plan = choice.strategy.label
        return choice.strategy, choice.predicted

    def estimate(self, ids: list[str], record, prompt_ids) -> None:
        """The cost model's seconds for the group as it ran, and as plain batches in file order would have run it
        (with the lengths generated)."""
        if self.device_costs is None:
            return
        tokens = {sample_id: len(prompt_ids[sample_id]) for sample_id in ids}
        self.totals.device_profile = self.device_costs.name
        self.totals.estimated_s += estimated_seconds(self.device_costs, tokens, record)
        self.totals.data_order_estimated_s += data_order_seconds(
            ids, final_lengths(record), self.device_costs, tokens, self.settings.batch_size
        )

    def answer_static(self, strategy, ids: list[str], cap: int, prompt_ids, predicted, progress):
        """The group's static batches through the scheduler and the executor, each answer written as it is final."""
        config = schedule_config(strategy, self.settings.batch_size, len(ids), cap, self.settings.vbs_table)
        return run_schedule(
            ids,
            predicted.lengths,
            config,
            self.executor,
            self.progress_reporter(progress),
            caps=predicted.caps,
            retry_caps=predicted.retry_caps,
            on_result=self.answer_writer(prompt_ids, predicted.lengths),
        )

    def answer_queue(self, strategy, ids: list[str], group: GroupSettings, prompt_ids, predictions, progress):
        """The group as one queue of continuous batching, `--batch-size` rows at once, shortest prediction first
        (data order under vanilla); each answer is written and flushed as it ends."""
        by_prediction = predictions if strategy.predictor != "vanilla" else None
        order = admission_order(ids, by_prediction, len(ids))
        write = self.answer_writer(prompt_ids, predictions)
        started, generated_before = time.perf_counter(), self.totals.generated_tokens

        def on_result(told) -> None:
            write(told, attempts=1)
            self.writer.flush()
            progress.update(1)
            rate = (self.totals.generated_tokens - generated_before) / max(1e-9, time.perf_counter() - started)
            progress.set_postfix_str(f"{rate:.0f} tokens/s", refresh=False)

        outcome = self.engine.run_queue(
            order, prompt_ids, group.cap, self.settings.batch_size, group.temperature, self.executor.replay,
            on_result, group.seed, top_p=group.top_p if group.temperature > 0 else 1.0, stops=self.executor.stops,
        )  # fmt: skip
        for request_id, stops in self.executor.stops.items():  # an engine that ran a row past its stop string
            if request_id in outcome.finished and holds_stop(outcome.texts[request_id], stops):
                outcome.finished[request_id] = True
        return order, outcome

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
        """A request's final answer to its line: `write(result, executed)` from the scheduler (static batches), or
        `write(told, attempts=1)` from continuous batching; both have id, text, length and finished."""

        def write(result, executed=None, attempts: int | None = None) -> None:
            text, stopped = cut_at_stop(result.text, self.executor.stops.get(result.id, ()))
            self.writer.add(
                answer_row(
                    result.id,
                    text,
                    len(prompt_ids[result.id]),
                    result.length,
                    result.finished or stopped,
                    predictions[result.id],
                    attempts if attempts is not None else executed.batch.attempt + 1,
                )
            )
            self.totals.generated_tokens += result.length
            self.totals.latency_sum_s += time.perf_counter() - self.started

        return write

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

    def count_static(self, record) -> int:
        """The group's totals from the scheduler's record; returns its token slots."""
        self.count_answers(list(record.results.values()))
        totals = self.totals
        totals.recomputed += sum(result.recomputed for result in record.results.values())
        totals.oom_splits += sum(executed.oom_splits for executed in record.batches)
        return sum(executed.token_slots for executed in record.batches)

    def count_continuous(self, record, finished: dict[str, bool]) -> int:
        """The group's totals from continuous batching; its token slots are the iteration model's (iterations x
        rows, src.scheduling.metrics), with the lengths generated."""
        self.count_answers([_Answered(length, finished[sample_id]) for sample_id, length in record.lengths.items()])
        return max(record.finish_steps.values(), default=0) * self.settings.batch_size

    def count_answers(self, answers) -> None:
        lengths = [answer.length for answer in answers]
        self.totals.requests += len(answers)
        self.totals.data_order_token_slots += data_order_token_slots(lengths, self.settings.batch_size)
        self.totals.truncated += sum(not answer.finished for answer in answers)

    def refuse(self, sample_id: str, message: str, progress) -> None:
        self.writer.add(error_row(sample_id, message))
        self.writer.flush()
        self.totals.errors += 1
        progress.update(1)


def answer_pending(runner: Runner, args, label: str, pending: set[str], processes) -> None:
    """The pending requests in file order, as a stream, in groups shared round robin (every process reads the same
    file); the main process answers the malformed ones with an error line."""
    from tqdm import tqdm

    total = len(pending) if not processes.distributed else None  # each process shows its own share
    with runner.writer, tqdm(total=total, unit="request", desc=label, disable=not processes.is_main) as progress:

        def runnable():
            for request in read_requests(args.input):
                if request.id not in pending:
                    continue
                if request.problem is None:
                    yield request
                elif processes.is_main:
                    runner.refuse(request.id, request.problem, progress)

        defaults = GroupSettings(args.max_length, args.temperature, args.top_p, args.seed)
        for number, (settings, group) in enumerate(groups_of(runnable(), args.group_size, defaults)):
            if number % processes.count == processes.rank:
                runner.answer_group(settings, group, progress)
