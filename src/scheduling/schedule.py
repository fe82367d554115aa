"""Running a schedule, as pure Python over lengths: no torch, no model.

The planner (src.scheduling.batches) decides batches; `run_schedule` runs each through an injected `run_batch`
callable and returns a record of what ran, from which src.scheduling.metrics computes the metrics. Samples are
identified by id everywhere, so no reordering can send a result to the wrong prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .batches import Batch, ScheduleConfig, plan_first_batches, plan_recompute


@dataclass(frozen=True)
class BatchOutcome:
    """What an executor returns for one batch, by id."""

    lengths: Mapping[str, int]  # generated tokens up to and including EOS, at most the batch's cap
    finished: Mapping[str, bool]  # emitted EOS within the cap
    texts: Mapping[str, str] = field(default_factory=dict)
    # The sub-batches that really ran, in order, when the executor had to split the batch (out of memory);
    # None: it ran whole.
    parts: tuple[tuple[str, ...], ...] | None = None
    oom_splits: int = 0  # the halvings that out-of-memory errors forced (parts holds the pieces that then ran)
    # The executor's own columns of this batch's row (where its time went, prompt tokens served from kept KV
    # caches): the scheduler carries them to the record unread, so they stay with their batch whatever runs
    executor_fields: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class ExecutedBatch:
    batch: Batch
    lengths: Mapping[str, int]
    finished: Mapping[str, bool]
    texts: Mapping[str, str] = field(default_factory=dict)
    elapsed_s: float | None = None  # seconds since the run started, when the batch ended
    parts: tuple[tuple[str, ...], ...] | None = None  # see BatchOutcome
    oom_splits: int = 0  # see BatchOutcome
    executor_fields: Mapping[str, object] = field(default_factory=dict)  # see BatchOutcome

    @property
    def runs(self) -> tuple[tuple[str, ...], ...]:
        """The batches that really ran: the planned one, or the pieces an out-of-memory split cut it into."""
        return self.parts or (self.batch.ids,)

    @property
    def steps(self) -> int:
        """Each run goes until its longest member stops; split pieces run one after another."""
        return sum(max(self.lengths[sample_id] for sample_id in run) for run in self.runs)

    @property
    def token_slots(self) -> int:
        """Slots as executed: each run's steps times its rows."""
        return sum(max(self.lengths[sample_id] for sample_id in run) * len(run) for run in self.runs)

    @property
    def useful_tokens(self) -> int:
        return sum(self.lengths.values())


@dataclass(frozen=True)
class SampleResult:
    id: str
    length: int
    finished: bool
    text: str | None
    recomputed: bool
    first_cap: int  # the cap of the sample's first batch


@dataclass(frozen=True)
class RunRecord:
    batches: list[ExecutedBatch]
    results: dict[str, SampleResult]  # in the order of the ids given to run_schedule


RunBatch = Callable[[Batch], BatchOutcome]


def _check_outcome(batch: Batch, outcome: BatchOutcome) -> None:
    for sample_id in batch.ids:
        if sample_id not in outcome.lengths or sample_id not in outcome.finished:
            raise RuntimeError(f"executor returned no result for id {sample_id}")
        length = outcome.lengths[sample_id]
        if not 1 <= length <= batch.max_new_tokens:
            raise RuntimeError(f"executor returned length {length} for id {sample_id}, cap {batch.max_new_tokens}")


def run_schedule(
    ids: list[str],
    predictions: Mapping[str, int],
    config: ScheduleConfig,
    run_batch: RunBatch,
    on_batch: Callable[[ExecutedBatch, int], None] | None = None,
    clock: Callable[[], float] | None = None,
    caps: Mapping[str, int] | None = None,
    retry_caps: Sequence[Mapping[str, int]] = (),
    on_result: Callable[[SampleResult, ExecutedBatch], None] | None = None,
) -> RunRecord:
    """Run every group: its first batches, then (FCR) its failures again: once per entry of `retry_caps` (an upper
    quantile of each length, see `plan_recompute`), and a last time at max_length.

    A failure is a sample that did not finish within a cap that left it short of max_length; one stopped at
    max_length is final (recomputing it would repeat the same work), and so is everything the last retry returns.
    A resumed sample's length is the tokens it had plus those of its last batch, at most max_length (a batch of
    resumed samples runs as far as its least advanced member may, and a row that goes past max_length is cut there
    and counted unfinished). `on_batch(batch, done)` is told how many samples have their final result after each
    batch, after `on_result(result, batch)` was told each final result that batch gave.
    """
    if len(set(ids)) != len(ids):
        raise ValueError("ids must be unique")
    run = _Run(config, run_batch, on_batch, on_result, clock)
    attempts = [*retry_caps, None] if config.fcr else []
    for group, first in enumerate(range(0, len(ids), config.group_size)):
        group_ids = ids[first : first + config.group_size]
        failed: dict[str, int] = {}
        for batch in plan_first_batches(group_ids, predictions, config, group, caps):
            failed.update(run.execute(batch, last=False))
        for attempt, attempt_caps in enumerate(attempts, start=1):
            if not failed:
                break
            known_above, failed = failed, {}
            last = attempt == len(attempts)
            for batch in plan_recompute(list(known_above), config, group, known_above, attempt_caps, attempt):
                failed.update(run.execute(batch, last))
    return RunRecord(run.executed, {sample_id: run.results[sample_id] for sample_id in ids})


class _Run:
    """A schedule's run so far: the batches executed, the final results, each sample's first cap."""

    def __init__(self, config, run_batch, on_batch, on_result, clock):
        self.config, self.run_batch, self.clock = config, run_batch, clock
        self.on_batch, self.on_result = on_batch, on_result
        self.start = clock() if clock else 0.0
        self.executed: list[ExecutedBatch] = []
        self.results: dict[str, SampleResult] = {}
        self.first_caps: dict[str, int] = {}

    def execute(self, batch: Batch, last: bool) -> dict[str, int]:
        """Runs the batch; returns its failures, each with the length it is now known to exceed."""
        outcome = self.run_batch(batch)
        _check_outcome(batch, outcome)
        done = ExecutedBatch(
            batch,
            {sample_id: int(outcome.lengths[sample_id]) for sample_id in batch.ids},
            {sample_id: bool(outcome.finished[sample_id]) for sample_id in batch.ids},
            dict(outcome.texts),
            self.clock() - self.start if self.clock else None,
            outcome.parts,
            outcome.oom_splits,
            dict(outcome.executor_fields),
        )
        self.executed.append(done)
        config, failed_here = self.config, {}
        for row, sample_id in enumerate(batch.ids):
            self.first_caps.setdefault(sample_id, batch.max_new_tokens)
            length = done.lengths[sample_id] + (batch.resume_from[row] if batch.resume_from else 0)
            finished = done.finished[sample_id] and length <= config.max_length
            if config.fcr and not finished and length < config.max_length and not last:
                failed_here[sample_id] = length
                continue
            self.results[sample_id] = SampleResult(
                sample_id,
                min(length, config.max_length),
                finished,
                done.texts.get(sample_id),
                batch.recompute,
                self.first_caps[sample_id],
            )
            if self.on_result:
                self.on_result(self.results[sample_id], done)
        if self.on_batch:
            self.on_batch(done, len(self.results))
        return failed_here


def final_batches(record: RunRecord) -> dict[str, tuple[int, ExecutedBatch]]:
    """For each sample, the batch that gave its final result and the decode steps run up to its end
    (batches run one after another)."""
    final: dict[str, tuple[int, ExecutedBatch]] = {}
    steps = 0
    for executed in record.batches:
        steps += executed.steps
        for sample_id in executed.batch.ids:
            if record.results[sample_id].recomputed == executed.batch.recompute:
                final[sample_id] = (steps, executed)
    return {sample_id: final[sample_id] for sample_id in record.results}


def replay_executor(lengths: Mapping[str, int]) -> RunBatch:
    """An executor without a model: each sample ends at its recorded length, capped by the batch; a resumed sample
    makes what its recorded length still lacks.

    This is what a model run with replayed lengths produces, so the dry run and the tests share the
    scheduler and the metrics with the real engine.
    """

    def run_batch(batch: Batch) -> BatchOutcome:
        progress = batch.resume_from or (0,) * len(batch.ids)
        wanted = {
            sample_id: max(1, int(lengths[sample_id]) - done)
            for sample_id, done in zip(batch.ids, progress, strict=True)
        }
        return BatchOutcome(
            {sample_id: min(length, batch.max_new_tokens) for sample_id, length in wanted.items()},
            {sample_id: length <= batch.max_new_tokens for sample_id, length in wanted.items()},
        )

    return run_batch
