"""Sequence scheduling, as pure Python over lengths: no torch, no model.

The scheduler decides and returns plain data (`Batch`); a runner executes each batch through an injected
`run_batch` callable and returns a record of what ran, from which src.scheduling.metrics computes the metrics.
Samples are identified by id everywhere, so no reordering can send a result to the wrong prompt.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

# Predictions and VBS work in 50-token buckets: the paper found exact lengths too noisy to learn and
# 50 tokens fine enough that a batch's cap wastes little (its Acc-50 metric uses the same cell).
BUCKET_CELL = 50

# The paper's variable batch size: bucket (tokens) -> batch size, tuned for Vicuna-7B on an A100.
# Short buckets fit many more sequences in memory, so they get larger batches.
PAPER_VBS_TABLE: Mapping[int, int] = {50: 256, 100: 128, 150: 64, 200: 32, 250: 16, 300: 16}
# Batch size of buckets the table does not list, and the smallest last batch that a bucket keeps:
# a smaller remainder moves up into the next bucket, where it fills a batch instead of running alone.
VBS_DEFAULT_BATCH_SIZE = 16


def bucket_of(length: int, cell: int = BUCKET_CELL) -> int:
    """Round a length up to a multiple of `cell` (the paper's 50-token buckets): 1..50 -> 50, 51 -> 100."""
    return max(1, -(-int(length) // cell)) * cell


def parse_vbs_table(text: str) -> dict[int, int]:
    """`50:256,100:128` -> {50: 256, 100: 128}; raises ValueError on anything else."""
    table = {}
    for item in text.split(","):
        bucket, _, size = item.strip().partition(":")
        bucket_value, size_value = int(bucket), int(size)
        if bucket_value < 1 or size_value < 1 or bucket_value % BUCKET_CELL:
            raise ValueError(f"bad VBS entry {item!r}: buckets are positive multiples of {BUCKET_CELL}")
        table[bucket_value] = size_value
    return table


@dataclass(frozen=True)
class ScheduleConfig:
    batch_size: int = 16
    group_size: int = 256
    max_length: int = 512
    sort: bool = True  # False keeps the data order (vanilla)
    vbs: bool = False
    fcr: bool = False
    # FCR failures keep the tokens they generated and continue from them (from their kept KV cache where the
    # executor has one, else prefilling prompt and tokens again) instead of starting over as the paper's FCR does
    resume: bool = False
    vbs_table: Mapping[int, int] = field(default_factory=lambda: dict(PAPER_VBS_TABLE))
    vbs_default_batch_size: int = VBS_DEFAULT_BATCH_SIZE

    def __post_init__(self):
        for name in ("batch_size", "group_size", "max_length", "vbs_default_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")

    def vbs_batch_size(self, bucket: int) -> int:
        return self.vbs_table.get(bucket, self.vbs_default_batch_size)


@dataclass(frozen=True)
class Batch:
    ids: tuple[str, ...]
    max_new_tokens: int  # the batch stops when all members finish or at this cap
    group: int
    recompute: bool = False  # an FCR retry (any attempt after the first)
    bucket: int | None = None  # the VBS bucket the batch was cut from
    # tokens each member (in `ids` order) already generated and continues from; None: every member starts afresh.
    # `max_new_tokens` counts the tokens generated in this batch.
    resume_from: tuple[int, ...] | None = None
    attempt: int = 0  # 0: the first attempt, 1: the first FCR retry, ...
    # +resume: a member that stops unfinished with fewer tokens in all than this continues in a later batch, so an
    # executor that can keeps what lets it continue cheaply (its KV cache); None: no member continues
    resume_below: int | None = None
    # a resumed batch runs as far as its least advanced member may, so a member further on can pass max_length: its
    # tokens past this limit (in all) are cut, as the scheduler counts them; None: no member is resumed
    length_limit: int | None = None


def clamp_prediction(value: int | float, max_length: int) -> int:
    """Every prediction lies in [1, max_length]: a cap beyond max_length is never allowed."""
    return min(max(int(round(value)), 1), max_length)


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def plan_first_batches(
    ids: list[str],
    predictions: Mapping[str, int],
    config: ScheduleConfig,
    group: int = 0,
    caps: Mapping[str, int] | None = None,
) -> list[Batch]:
    """Batches for one group's first attempt.

    Sorted (stable) by prediction unless `config.sort` is off; cut into `batch_size` batches, or with VBS
    into per-bucket batches whose sizes follow the table. Under FCR a batch's cap is its largest prediction
    (its bucket with VBS), or, where `caps` gives each sample its own cap (an upper quantile of its
    length), the largest cap of its members; without FCR every batch may run to `max_length`.
    """
    if not ids:
        return []
    ordered = sorted(ids, key=lambda sample_id: predictions[sample_id]) if (config.sort or config.vbs) else list(ids)
    batches: list[Batch] = []
    if not config.vbs:
        for members in _chunks(ordered, config.batch_size):
            cap = max((caps or predictions)[sample_id] for sample_id in members) if config.fcr else config.max_length
            cap = min(cap, config.max_length)
            batches.append(Batch(tuple(members), cap, group, resume_below=_resume_below(config)))
        return batches

    by_bucket: dict[int, list[str]] = {}
    for sample_id in ordered:
        by_bucket.setdefault(bucket_of(predictions[sample_id]), []).append(sample_id)
    largest_prediction = max(predictions[sample_id] for sample_id in ids)
    carried: list[str] = []
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket] + carried  # carried samples join after the bucket's own, as upstream
        carried = []
        size = config.vbs_batch_size(bucket)
        pieces = _chunks(members, size)
        smallest_kept = max(size // 2, config.vbs_default_batch_size)
        if bucket < largest_prediction and len(pieces[-1]) < smallest_kept:
            carried = pieces.pop()  # too small to run alone: it moves up into the next non-empty bucket
        for piece in pieces:
            cap = config.max_length
            if config.fcr:
                cap = min(bucket if caps is None else max(caps[sample_id] for sample_id in piece), config.max_length)
            batches.append(Batch(tuple(piece), cap, group, bucket=bucket, resume_below=_resume_below(config)))
    return batches


def _resume_below(config: ScheduleConfig) -> int | None:
    """Under FCR's +resume a failure (unfinished short of max_length) continues in a later batch."""
    return config.max_length if config.fcr and config.resume else None


def plan_recompute(
    failed_ids: list[str],
    config: ScheduleConfig,
    group: int = 0,
    known_above: Mapping[str, int] | None = None,
    caps: Mapping[str, int] | None = None,
    attempt: int = 1,
) -> list[Batch]:
    """An FCR retry of a group's failures. `known_above[id]`: the length the sample is known to exceed (where its
    last attempt stopped). Without `caps` (the paper's FCR, and every last retry) each batch may run to max_length;
    with `caps` (an upper quantile of each length) a sample's cap is that quantile, but at least one bucket beyond
    what it is known to exceed, since a cap below that only repeats the failure. Under `config.resume` a sample
    continues from the tokens it has and its cap counts the tokens still to make. Failures are sorted (stably, so
    the paper's retry keeps the order their first batches ran) by those remaining tokens, so that a batch holds
    samples that need about as many."""
    known_above = known_above or {}
    progress = {sample_id: known_above.get(sample_id, 0) if config.resume else 0 for sample_id in failed_ids}
    remaining = {}
    for sample_id in failed_ids:
        cap = config.max_length
        if caps is not None:
            cap = min(max(caps[sample_id], known_above.get(sample_id, 0) + BUCKET_CELL), config.max_length)
        remaining[sample_id] = cap - progress[sample_id]
    ordered = sorted(failed_ids, key=lambda sample_id: remaining[sample_id])
    return [
        Batch(
            tuple(members),
            max(remaining[sample_id] for sample_id in members),
            group,
            recompute=True,
            resume_from=tuple(progress[sample_id] for sample_id in members) if config.resume else None,
            length_limit=config.max_length if config.resume else None,
            attempt=attempt,
            # the last retry, at max_length, is final
            resume_below=config.max_length if config.resume and caps is not None else None,
        )
        for members in _chunks(ordered, config.batch_size)
    ]


# --------------------------------------------------------------------------- execution and metrics


@dataclass(frozen=True)
class BatchOutcome:
    """What an executor returns for one batch, by id."""

    lengths: Mapping[str, int]  # generated tokens up to and including EOS, at most the batch's cap
    finished: Mapping[str, bool]  # emitted EOS within the cap
    texts: Mapping[str, str] = field(default_factory=dict)
    # The sub-batches that really ran, in order, when the executor had to split the batch (out of memory);
    # None: it ran whole.
    parts: tuple[tuple[str, ...], ...] | None = None


@dataclass(frozen=True)
class ExecutedBatch:
    batch: Batch
    lengths: Mapping[str, int]
    finished: Mapping[str, bool]
    texts: Mapping[str, str] = field(default_factory=dict)
    elapsed_s: float | None = None  # seconds since the run started, when the batch ended
    parts: tuple[tuple[str, ...], ...] | None = None  # see BatchOutcome

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
    start = clock() if clock else 0.0
    executed: list[ExecutedBatch] = []
    results: dict[str, SampleResult] = {}
    first_caps: dict[str, int] = {}
    attempts = [*retry_caps, None] if config.fcr else []

    def execute(batch: Batch, last: bool) -> dict[str, int]:
        """Runs the batch; returns its failures, each with the length it is now known to exceed."""
        outcome = run_batch(batch)
        _check_outcome(batch, outcome)
        done = ExecutedBatch(
            batch,
            {sample_id: int(outcome.lengths[sample_id]) for sample_id in batch.ids},
            {sample_id: bool(outcome.finished[sample_id]) for sample_id in batch.ids},
            dict(outcome.texts),
            clock() - start if clock else None,
            outcome.parts,
        )
        executed.append(done)
        failed_here = {}
        for row, sample_id in enumerate(batch.ids):
            first_caps.setdefault(sample_id, batch.max_new_tokens)
            length = done.lengths[sample_id] + (batch.resume_from[row] if batch.resume_from else 0)
            finished = done.finished[sample_id] and length <= config.max_length
            if config.fcr and not finished and length < config.max_length and not last:
                failed_here[sample_id] = length
                continue
            results[sample_id] = SampleResult(
                sample_id,
                min(length, config.max_length),
                finished,
                done.texts.get(sample_id),
                batch.recompute,
                first_caps[sample_id],
            )
            if on_result:
                on_result(results[sample_id], done)
        if on_batch:
            on_batch(done, len(results))
        return failed_here

    for group, first in enumerate(range(0, len(ids), config.group_size)):
        group_ids = ids[first : first + config.group_size]
        failed: dict[str, int] = {}
        for batch in plan_first_batches(group_ids, predictions, config, group, caps):
            failed.update(execute(batch, last=False))
        for attempt, attempt_caps in enumerate(attempts, start=1):
            if not failed:
                break
            known_above, failed = failed, {}
            last = attempt == len(attempts)
            for batch in plan_recompute(list(known_above), config, group, known_above, attempt_caps, attempt):
                failed.update(execute(batch, last))
    return RunRecord(executed, {sample_id: results[sample_id] for sample_id in ids})


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


# --------------------------------------------------------------------------- continuous batching


def admission_order(ids: list[str], predictions: Mapping[str, int] | None, group_size: int) -> list[str]:
    """The queue of a continuous-batching run: data order (FCFS), or shortest prediction first within each
    group, so that no request waits behind a later group's (the groups arrive one after another)."""
    if predictions is None:
        return list(ids)
    order: list[str] = []
    for first in range(0, len(ids), group_size):
        order.extend(sorted(ids[first : first + group_size], key=lambda sample_id: predictions[sample_id]))
    return order


@dataclass(frozen=True)
class ContinuousRecord:
    order: list[str]  # admission order
    lengths: dict[str, int]
    finished: dict[str, bool]
    finish_steps: dict[str, int]  # the iteration in which each sample produced its last token
    slots: int
    arrival_steps: dict[str, float] | None = None  # when each request arrived; None: all at once, at 0


def simulate_continuous(order: list[str], lengths: Mapping[str, int], slots: int, max_length: int) -> ContinuousRecord:
    """Iteration-level batching with `slots` sequences at most: every iteration each running sequence makes one
    token, and a slot freed in one iteration takes the next queued request in the next. A sample of length L
    admitted after iteration t finishes at t + L (its prefill makes its first token)."""
    if slots < 1:
        raise ValueError("slots must be at least 1")
    free_at = [0] * slots  # heap: the iteration after which each slot is free
    finish: dict[str, int] = {}
    capped: dict[str, int] = {}
    for sample_id in order:
        capped[sample_id] = min(max(1, int(lengths[sample_id])), max_length)
        start = heapq.heappop(free_at)
        finish[sample_id] = start + capped[sample_id]
        heapq.heappush(free_at, finish[sample_id])
    finished = {sample_id: int(lengths[sample_id]) <= max_length for sample_id in order}
    return ContinuousRecord(list(order), capped, finished, finish, slots)


def simulate_continuous_arrivals(
    arrival_steps: Mapping[str, float],
    lengths: Mapping[str, int],
    slots: int,
    max_length: int,
    priorities: Mapping[str, float] | None = None,
    aging: float = 0.0,
) -> ContinuousRecord:
    """Iteration-level batching of requests that arrive over time (in decode steps). Whenever a slot is free, the
    waiting request with the smallest `priority - aging x steps waited` is admitted: with `priorities` the predicted
    lengths, shortest first, where aging lets a long request that has waited `p / aging` steps overtake any newcomer
    (the guard against starving it); without priorities, first come first served. Ties go to the earlier arrival.
    A request admitted at step t finishes at t + its length, as in `simulate_continuous`."""
    if slots < 1:
        raise ValueError("slots must be at least 1")
    arriving = sorted(arrival_steps, key=lambda sample_id: (arrival_steps[sample_id], sample_id))
    position = {sample_id: index for index, sample_id in enumerate(arriving)}
    free_at = [0.0] * slots  # heap: when each slot is free
    waiting: list[str] = []
    order: list[str] = []
    finish: dict[str, int] = {}
    capped = {sample_id: min(max(1, int(lengths[sample_id])), max_length) for sample_id in arriving}
    next_arrival = 0

    def admission_key(sample_id: str, now: float) -> tuple[float, int]:
        if priorities is None:
            return (arrival_steps[sample_id], position[sample_id])
        return (priorities[sample_id] - aging * (now - arrival_steps[sample_id]), position[sample_id])

    while len(order) < len(arriving):
        now = max(heapq.heappop(free_at), 0.0)
        if not waiting and next_arrival < len(arriving):  # the slot idles until the next request arrives
            now = max(now, arrival_steps[arriving[next_arrival]])
        while next_arrival < len(arriving) and arrival_steps[arriving[next_arrival]] <= now:
            waiting.append(arriving[next_arrival])
            next_arrival += 1
        chosen = min(waiting, key=lambda sample_id, at=now: admission_key(sample_id, at))
        waiting.remove(chosen)
        order.append(chosen)
        start = -(-now // 1)  # admissions happen between iterations
        finish[chosen] = int(start) + capped[chosen]
        heapq.heappush(free_at, float(finish[chosen]))
    finished = {sample_id: int(lengths[sample_id]) <= max_length for sample_id in arriving}
    return ContinuousRecord(order, capped, finished, finish, slots, dict(arrival_steps))


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
